# The Squire worker image, with the demo operations (squire_examples.ops).
#
# Build from the repository root:
#
#   docker build -f deploy/docker/worker.Dockerfile -t squire-worker:0.1.0 .
#
# Your own operations: extend this image (see deploy/docker/README.md and
# deploy/docker/custom-worker.Dockerfile):
#
#   FROM squire-worker:0.1.0
#   COPY my_ops.py /app/
#   ENV SQUIRE_OPS=my_ops
#
# BuildKit (Docker 23+) reads worker.Dockerfile.dockerignore next to this file.
# tests/deploy/test_docker.py checks this file statically (no Docker engine in CI).

# ---------------------------------------------------------------- builder
FROM python:3.11.9-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# README.md* (pyproject's readme) may match nothing: a wildcard next to a
# file that always exists keeps every builder happy either way.
COPY pyproject.toml README.md* ./
COPY clients/python/squire ./clients/python/squire
COPY examples ./examples
COPY orchestrator_service ./orchestrator_service
COPY worker_service ./worker_service
COPY squire_kernel ./squire_kernel

RUN pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links=/wheels squire

# ---------------------------------------------------------------- final
FROM python:3.11.9-slim-bookworm

RUN groupadd --system --gid 10001 squire \
 && useradd --system --uid 10001 --gid squire --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin squire

# The virtualenv keeps its pip on purpose: an image that extends this one
# installs its ops package into the same environment (USER root; pip install).
COPY --from=builder /opt/venv /opt/venv

# /app is on the import path so a plain `COPY my_ops.py /app/` is importable,
# by the worker and by its spawned process-pool children alike.
# SQUIRE_OPS names the ops module; an extended image overrides it, and the
# Kubernetes manifests deliberately pass no --ops flag (a flag would win).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SQUIRE_OPS=squire_examples.ops

WORKDIR /app

# 9465: /metrics, /healthz (liveness), /readyz (readiness). The worker dials
# out to the orchestrator; nothing connects to it except probes and Prometheus.
EXPOSE 9465

USER 10001:10001

# Exec form: the worker is PID 1 and drains on SIGTERM (hands back unstarted
# tasks, finishes running ones within --drain-grace, exits 0).
ENTRYPOINT ["squire-worker"]
