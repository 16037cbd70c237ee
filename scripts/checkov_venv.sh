#!/usr/bin/env bash
# checkov (the Kubernetes manifest scanner the deploy tests run) in its own venv, .venv-checkov: its many
# pinned dependencies would clash with requirements/constraints.txt. Idempotent: reinstalls only when the
# pin below changes. tests/unit/test_deploy_k8s_checkov.py calls .venv-checkov/bin/checkov.
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV=3.3.30
VENV=.venv-checkov
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

version() { "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null; }
if [ "$(version)" = "$CHECKOV" ]; then
  echo "checkov: up to date ($CHECKOV in $VENV)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV" 2>&1 | grep -v '^WARNING: Location' || true
installed="$(version || true)"
[ "$installed" = "$CHECKOV" ] || { echo "checkov: $VENV has '$installed', wanted $CHECKOV" >&2; exit 1; }
echo "checkov: installed $CHECKOV in $VENV"
