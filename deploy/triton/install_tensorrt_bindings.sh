#!/usr/bin/env bash
# TensorRT's Python bindings at exactly the version of the libnvinfer this Triton container serves with:
# an engine only loads in the TensorRT that built it, so the builder must be the server's own version.
# Usage: install_tensorrt_bindings.sh TENSORRT_MAJOR (from triton.Dockerfile's NGC_TENSORRT: the major the
# engine builder's API names were checked against; another major stops the build).
set -euo pipefail
want_major=$1

lib=$(ldconfig -p | awk '/libnvinfer\.so\.[0-9]+ /{print $NF; exit}')
[ -n "$lib" ] || { echo "no libnvinfer in this image: is it the NGC Triton container?" >&2; exit 1; }
# getInferLibVersion() = major*10000 + minor*100 + patch (TensorRT >= 10).
version=$(python3 -c 'import ctypes, sys
v = ctypes.CDLL(sys.argv[1]).getInferLibVersion()
print(f"{v // 10000}.{v // 100 % 100}.{v % 100}")' "$lib")
[ "${version%%.*}" = "$want_major" ] || {
  echo "libnvinfer is TensorRT $version; triton.Dockerfile's NGC_TENSORRT says $want_major" >&2; exit 1; }
cuda_major=${CUDA_VERSION%%.*}
[ -n "$cuda_major" ] || { echo "CUDA_VERSION is not set in this image" >&2; exit 1; }
echo "libnvinfer $version ($lib), CUDA $CUDA_VERSION: installing tensorrt-cu${cuda_major}==${version}.*"
pip install "tensorrt-cu${cuda_major}==${version}.*"
python3 -c 'import sys, tensorrt
assert tensorrt.__version__.startswith(sys.argv[1] + "."), (tensorrt.__version__, sys.argv[1])
print("tensorrt", tensorrt.__version__)' "$version"
