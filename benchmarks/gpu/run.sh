#!/usr/bin/env bash
# The GPU check, prepared: on a machine with an NVIDIA GPU, Docker with the NVIDIA container toolkit, the
# NGC base image already pulled and this repository after `make setup`, it builds the Triton image
# (deploy/triton.Dockerfile), writes the gpu profile's repository, builds both TensorRT engines with the
# exporter's `engines` command (each compared with the FP32 ONNX on real photos right after its build; a
# plan that misses the tolerance is deleted and the script stops), serves the gpu profile and measures the
# `piaa` ensemble (nvJPEG through DALI, TensorRT) at 1 to 256 images in flight, with Triton's CPU seconds
# for each point. Every step has a timeout; the whole takes under 10 minutes.
#
#   bash benchmarks/gpu/run.sh [OUT_DIR]       # default $OUT, else benchmarks/results/gpu-<UTC time>
#   PHOTOS=/data/photos bash benchmarks/gpu/run.sh
#
# Writes into OUT_DIR: steps.log, engine_backbone.json and engine_heads.json (TensorRT version, compute
# capability, parity), ensemble_<n>.json (images/s at n in flight), triton_cpu_<n>.json (CPU seconds of the
# Triton container over that point), metrics.txt (Triton's per-model timings), triton.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT_DIR=$(realpath -m "${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}}")
PHOTOS=$(realpath "${PHOTOS:-../shared/data/photos}")
PY=.venv/bin/python
# The NGC release is written once, in the Dockerfile; read from there, never repeated here.
NGC_TAG=$(sed -n 's/^ARG NGC_TAG=//p' deploy/triton.Dockerfile)
IMAGE="piaa-triton:${NGC_TAG}"
MODELS="$OUT_DIR/models"
PARITY="$OUT_DIR/parity_photos"
IN_FLIGHT="1 2 4 8 16 32 64 128 256"
MAX_BATCH=64 # the gpu profile's max_batch_size (piaa_triton.repository.GPU_BATCHING)

mkdir -p "$OUT_DIR" "$MODELS" "$PARITY"
log() { printf '== %s %s\n' "$(date -u +%T)" "$*" | tee -a "$OUT_DIR/steps.log"; }
in_container() {
  docker run --rm --gpus all --shm-size 1g -u "$(id -u):$(id -g)" \
    -v "$MODELS:/models" -v "$PARITY:/photos:ro" "$@"
}

[ -x "$PY" ] || { echo "run make setup first (no $PY)" >&2; exit 2; }
[ -n "$NGC_TAG" ] || { echo "no ARG NGC_TAG in deploy/triton.Dockerfile" >&2; exit 2; }

log "ONNX files (make setup's steps: up to date when it ran)"
timeout 300 "$PY" -m piaa_export.cli build
timeout 300 "$PY" -m piaa_export.cli quantize

log "Triton image $IMAGE FROM nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3"
docker image inspect "nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3" >/dev/null ||
  { echo "pull nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3 first (~15 GB)" >&2; exit 2; }
timeout 300 docker build -q -f deploy/triton.Dockerfile -t "$IMAGE" . >>"$OUT_DIR/steps.log"

log "gpu repository and engines (parity against the FP32 ONNX on 16 photos)"
find "$PHOTOS" -maxdepth 1 -iname '*.jp*g' | sort | head -16 | xargs -I{} cp {} "$PARITY/"
timeout 60 in_container "$IMAGE" prepare --profile gpu --out /models
for model in backbone heads; do
  timeout 240 in_container --entrypoint python3 "$IMAGE" -m piaa_export.cli engines \
    "/opt/piaa/onnx/$model.onnx" "/models/$model" --parity-photos /photos >"$OUT_DIR/engine_$model.json"
done
# Triton loads model.plan on a GPU kind the config does not list; launch.py links it the same way.
for model in backbone heads; do
  plan=$(cd "$MODELS/$model/1" && ls model_sm*.plan | head -1)
  ln -sf "$plan" "$MODELS/$model/1/model.plan"
done

log "serve the gpu profile"
CID=$(docker run -d --gpus all --shm-size 1g -p 127.0.0.1::8000 -p 127.0.0.1::8001 -p 127.0.0.1::8002 \
  -v "$MODELS:/models" "$IMAGE" serve --profile gpu --repository /models)
trap 'docker logs "$CID" >"$OUT_DIR/triton.log" 2>&1; docker rm -f "$CID" >/dev/null' EXIT
HTTP=$(docker port "$CID" 8000/tcp | head -1)
GRPC=$(docker port "$CID" 8001/tcp | head -1)
METRICS=$(docker port "$CID" 8002/tcp | head -1)
timeout 180 bash -c "until curl -sf http://$HTTP/v2/health/ready; do sleep 2; done"

cpu_usec() { docker exec "$CID" cat /sys/fs/cgroup/cpu.stat | awk '/^usage_usec/ {print $2}'; }
log "the ensemble at $IN_FLIGHT images in flight"
for n in $IN_FLIGHT; do
  batch=$((n < MAX_BATCH ? n : MAX_BATCH))
  images=$((n * 32 < 512 ? 512 : n * 32))
  before=$(cpu_usec)
  timeout 90 "$PY" -m piaa_triton.bench --url "$GRPC" --images "$images" --batch "$batch" \
    --concurrency $((n / batch)) --photos "$PHOTOS" >"$OUT_DIR/ensemble_$n.json"
  after=$(cpu_usec)
  printf '{"in_flight": %d, "images": %d, "triton_cpu_s": %s}\n' "$n" "$images" \
    "$(awk -v a="$after" -v b="$before" 'BEGIN {print (a - b) / 1e6}')" >"$OUT_DIR/triton_cpu_$n.json"
  log "$n in flight: $(tr -d ' \n' <"$OUT_DIR/ensemble_$n.json")"
done
curl -sf "http://$METRICS/metrics" >"$OUT_DIR/metrics.txt"
log "done: $OUT_DIR"
