#!/usr/bin/env bash
# The NGC image must carry what triton.Dockerfile's ARGs say (Triton, CUDA, Python, glibc): the requirements were
# resolved and the engine builder's TensorRT names checked for exactly those, so a mismatch stops the build.
# Usage: check_base.sh TRITON_VERSION CUDA_MAJOR_MINOR PYTHON_MAJOR_MINOR GLIBC_VERSION
set -euo pipefail
want_triton=$1 want_cuda=$2 want_python=$3 want_glibc=$4

triton=${TRITON_SERVER_VERSION:-$(cat /opt/tritonserver/TRITON_VERSION 2>/dev/null || true)}
python=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
glibc=$(ldd --version | awk 'NR == 1 {print $NF}')
fail=0
[ "$triton" = "$want_triton" ] || { echo "Triton is '$triton', triton.Dockerfile says $want_triton" >&2; fail=1; }
case "${CUDA_VERSION:-}" in
  "$want_cuda" | "$want_cuda".*) ;;
  *) echo "CUDA is '${CUDA_VERSION:-unset}', triton.Dockerfile says $want_cuda" >&2; fail=1 ;;
esac
[ "$python" = "$want_python" ] || { echo "Python is $python, triton.Dockerfile says $want_python" >&2; fail=1; }
[ "$glibc" = "$want_glibc" ] || { echo "glibc is $glibc, triton.Dockerfile says $want_glibc" >&2; fail=1; }
[ "$fail" = 0 ] || { echo "fix the NGC_* ARGs of deploy/triton.Dockerfile to match the base image" >&2; exit 1; }
echo "base image: Triton $triton, CUDA $CUDA_VERSION, Python $python, glibc $glibc"
