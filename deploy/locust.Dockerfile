# syntax=docker/dockerfile:1
# The load generator: Locust with benchmarks/locustfile.py, its two helper modules and piaa-client (no server
# code, no torch). Non-root. The same image runs the master and the workers (deploy/k8s/overlays/loadtest).
# Build from the repository root:  docker build -f deploy/locust.Dockerfile -t piaa-locust .
# Pin the base by digest in your registry mirror (docker buildx imagetools inspect python:3.11.13-slim-bookworm).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --- build: wheels for the pinned dependencies and piaa-client (its stubs are generated here) -----------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/src/requirements/constraints.txt
COPY requirements/constraints.txt requirements/constraints.txt
COPY deploy/locust-requirements.txt deploy/locust-requirements.txt
RUN pip wheel --wheel-dir /wheels -r deploy/locust-requirements.txt
COPY client client
RUN pip wheel --no-deps --wheel-dir /wheels ./client

# --- runtime --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /wheels /tmp/wheels
COPY deploy/locust-requirements.txt /tmp/locust-requirements.txt
# Offline from the wheels built above: exactly the pinned versions, nothing fetched.
RUN pip install --no-index --find-links /tmp/wheels -r /tmp/locust-requirements.txt piaa-client \
 && pip check \
 && rm -rf /tmp/wheels /tmp/locust-requirements.txt \
 && useradd --system --uid 10004 --no-create-home --shell /usr/sbin/nologin locust
# Locust puts the locustfile's folder on sys.path: piaa_bench here is only the two modules it imports.
COPY benchmarks/locustfile.py /opt/piaa-locust/locustfile.py
COPY benchmarks/piaa_bench/__init__.py benchmarks/piaa_bench/slo.py benchmarks/piaa_bench/traffic.py \
     /opt/piaa-locust/piaa_bench/
WORKDIR /opt/piaa-locust
USER 10004:10004
# 8089: the master's web UI; 5557: where the master listens for its workers.
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "/opt/piaa-locust/locustfile.py"]
