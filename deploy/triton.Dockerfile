# syntax=docker/dockerfile:1
# Triton for PIAA, FROM the NGC Triton container: our Python models (preprocess, and the cpu profile's
# ONNX Runtime models), DALI for nvJPEG decoding, and TensorRT's Python bindings at the container's own
# TensorRT version so the engine build (deploy/triton/launch.py prepare --engines, on the target GPU)
# produces engines this very Triton can load.
#
# Build from the repository root AFTER `make setup` (it writes and parity-checks build/onnx/*.onnx):
#   docker build -f deploy/triton.Dockerfile -t piaa-triton .
#
# The NGC release and what it carries are written here once, as these ARGs; the tests (requirements
# resolved for this Python, TensorRT names checked against this TensorRT's bindings) and docs/deployment.md
# read them from this file, and check_base.sh below fails the build if the pulled image disagrees.
# Pin the image by digest once pulled (docker buildx imagetools inspect nvcr.io/nvidia/tritonserver:<tag>).
ARG NGC_TAG=26.08
ARG NGC_TRITON=2.72.0
ARG NGC_TENSORRT=11
ARG NGC_CUDA=13.4
ARG NGC_PYTHON=3.12
ARG NGC_GLIBC=2.39
FROM nvcr.io/nvidia/tritonserver:${NGC_TAG}-py3
ARG NGC_TRITON
ARG NGC_TENSORRT
ARG NGC_CUDA
ARG NGC_PYTHON
ARG NGC_GLIBC

# The image's system Python is what the Python backend runs; pip may install into it (PEP 668 opt-out).
# Nothing of ours is pip-installed: our sources sit on PYTHONPATH (the `piaa` distribution is for 3.11).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/opt/piaa/src/client:/opt/piaa/src/model_repository:/opt/piaa/src/export \
    PIAA_ONNX_DIR=/opt/piaa/onnx \
    HOME=/tmp

COPY deploy/triton/check_base.sh /opt/piaa/
RUN bash /opt/piaa/check_base.sh "${NGC_TRITON}" "${NGC_CUDA}" "${NGC_PYTHON}" "${NGC_GLIBC}"
# DALI is in requirements.txt as the wheel for this CUDA major (nvidia-dali-cuda<major>0).
COPY requirements/constraints.txt deploy/triton/requirements.txt /opt/piaa/
RUN pip install -c /opt/piaa/constraints.txt -r /opt/piaa/requirements.txt
COPY deploy/triton/install_tensorrt_bindings.sh /opt/piaa/
RUN bash /opt/piaa/install_tensorrt_bindings.sh "${NGC_TENSORRT}"

# Sources, laid out as in the repository so piaa_triton finds model_repository/models next to itself.
# piaa_client contributes only the feature-space spec: without its __init__.py it is a namespace package,
# so the client's gRPC modules (and their generated stubs) are neither needed nor imported here.
COPY client/piaa_client/features.py /opt/piaa/src/client/piaa_client/
COPY model_repository/piaa_triton /opt/piaa/src/model_repository/piaa_triton
COPY model_repository/models /opt/piaa/src/model_repository/models
COPY export/piaa_export /opt/piaa/src/export/piaa_export
# heads*.onnx: heads.onnx, and a release's heads_<fs>.onnx when build/onnx holds one (copied there from
# build/release/<fs>/): launch.py serves each beside heads.onnx (docs/operations.md, the deployed rollout).
COPY build/onnx/backbone.onnx build/onnx/heads*.onnx build/onnx/manifest.json /opt/piaa/onnx/
# The INT8 backbones (piaa_export.quantize): the cpu profile serves backbone.int8.cpu.onnx by default,
# TensorRT's INT8 engine is built from backbone.int8.onnx.
COPY build/onnx/backbone.int8.cpu.onnx build/onnx/backbone.int8.onnx build/onnx/int8.json /opt/piaa/onnx/
COPY deploy/triton/launch.py /opt/piaa/launch.py

# Non-root; /models is the repository volume the engine build writes and Triton reads.
RUN mkdir -p /models && chown 1000:1000 /models
USER 1000:1000
WORKDIR /opt/piaa
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "/opt/piaa/launch.py", "ready"]
ENTRYPOINT ["python3", "/opt/piaa/launch.py"]
CMD ["serve", "--profile", "gpu", "--repository", "/models"]
