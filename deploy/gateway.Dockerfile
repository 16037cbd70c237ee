# syntax=docker/dockerfile:1
# The PIAA gateway: grpc.aio server + per-user weights in Redis. Small, non-root, no torch.
# Build from the repository root:  docker build -f deploy/gateway.Dockerfile -t piaa-gateway .
# Pin the base by digest in your registry mirror (docker buildx imagetools inspect python:3.11.13-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: wheels for the pinned dependencies and our two packages (stubs are generated here) ---------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# PIP_CONSTRAINT also pins the isolated build environments (setuptools, grpcio-tools for the stubs).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/requirements/constraints.txt
COPY requirements/constraints.txt requirements/constraints.txt
COPY deploy/gateway-requirements.txt deploy/gateway-requirements.txt
RUN pip wheel --wheel-dir /wheels -r deploy/gateway-requirements.txt
COPY client client
COPY pyproject.toml ./
COPY common/piaa_common common/piaa_common
COPY export/piaa_export export/piaa_export
COPY model_repository/piaa_triton model_repository/piaa_triton
COPY personalization/piaa_personalization personalization/piaa_personalization
COPY benchmarks/piaa_bench benchmarks/piaa_bench
# --no-deps: the `piaa` wheel also carries the exporter and Triton code, but none of their dependencies
# (torch, onnxruntime, Pillow) are installed below; the gateway imports none of them.
RUN pip wheel --no-deps --wheel-dir /wheels ./client .

# --- runtime --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /tmp/wheels
COPY deploy/gateway-requirements.txt /tmp/gateway-requirements.txt
# Offline from the wheels built above: exactly the pinned versions, nothing fetched.
RUN pip install --no-index --find-links /tmp/wheels -r /tmp/gateway-requirements.txt piaa-client piaa \
 && pip check \
 && rm -rf /tmp/wheels /tmp/gateway-requirements.txt \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin piaa
COPY deploy/healthcheck.py /usr/local/bin/piaa-healthcheck
USER 10001:10001
# Serve other containers; one worker per container (scale with replicas). The metrics port is worker 0's.
ENV PIAA_HOST=0.0.0.0 \
    PIAA_PORT=50151 \
    PIAA_METRICS_PORT=9100 \
    PIAA_WORKERS=1
EXPOSE 50151 9100
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/usr/local/bin/piaa-healthcheck"]
ENTRYPOINT ["python", "-m", "piaa_personalization.api.server"]
