# syntax=docker/dockerfile:1
# Triton for PIAA, FROM the NGC Triton container: our Python models (preprocess, and the cpu profile's
# ONNX Runtime models), DALI for nvJPEG decoding, and TensorRT's Python bindings at the container's own
# TensorRT version so the engine build (deploy/triton/launch.py prepare --engines, on the target GPU)
# produces engines this very Triton can load.
#
# Build from the repository root AFTER `make setup` (it writes and parity-checks build/onnx/*.onnx):
#   docker build -f deploy/triton.Dockerfile -t piaa-triton .
# 26.08 is the NGC release of Triton 2.73, the tritonclient pinned in requirements/constraints.txt.
# Pin it by digest once pulled (docker buildx imagetools inspect nvcr.io/nvidia/tritonserver:26.08-py3).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.08-py3
FROM ${TRITON_IMAGE}

# DALI's wheel is per CUDA major (nvidia-dali-cuda120 / -cuda130): match the container's CUDA.
ARG DALI_PACKAGE=nvidia-dali-cuda130==2.4.0
# The image's system Python is what the Python backend runs; pip may install into it (PEP 668 opt-out).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/opt/piaa/src/client:/opt/piaa/src/model_repository:/opt/piaa/src/export \
    PIAA_ONNX_DIR=/opt/piaa/onnx \
    HOME=/tmp

COPY requirements/constraints.txt deploy/triton/requirements.txt /opt/piaa/
RUN pip install -c /opt/piaa/constraints.txt -r /opt/piaa/requirements.txt "${DALI_PACKAGE}"
COPY deploy/triton/install_tensorrt_bindings.sh /opt/piaa/
RUN bash /opt/piaa/install_tensorrt_bindings.sh

# Sources, laid out as in the repository so piaa_triton finds model_repository/models next to itself.
COPY client/piaa_client/__init__.py client/piaa_client/features.py /opt/piaa/src/client/piaa_client/
COPY model_repository/piaa_triton /opt/piaa/src/model_repository/piaa_triton
COPY model_repository/models /opt/piaa/src/model_repository/models
COPY export/piaa_export /opt/piaa/src/export/piaa_export
COPY build/onnx/backbone.onnx build/onnx/heads.onnx build/onnx/manifest.json /opt/piaa/onnx/
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
