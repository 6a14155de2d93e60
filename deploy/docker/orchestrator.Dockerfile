# The Squire orchestrator image.
#
# Build from the repository root (the build context must hold pyproject.toml
# and the packages):
#
#   docker build -f deploy/docker/orchestrator.Dockerfile -t squire-orchestrator:0.1.0 .
#
# BuildKit (Docker 23+) reads orchestrator.Dockerfile.dockerignore next to this
# file, so the context needs no .dockerignore at the repository root.
#
# tests/deploy/test_docker.py checks this file statically (no Docker engine in
# CI): pinned base image, non-root numeric USER, entry point from pyproject's
# [project.scripts], no compilers in the final stage, EXPOSEd default ports.

# ---------------------------------------------------------------- builder
# Every dependency ships manylinux wheels, so the builder needs no compiler
# either; it is a separate stage so pip's caches and the source tree stay out
# of the final image.
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

# Wheels for squire and all its dependencies, then a virtualenv installed from
# those wheels only (--no-index: what was built is exactly what ships).
RUN pip wheel --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links=/wheels squire

# ---------------------------------------------------------------- final
FROM python:3.11.9-slim-bookworm

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and
# deploy/k8s/base can set runAsUser to the same number.
RUN groupadd --system --gid 10001 squire \
 && useradd --system --uid 10001 --gid squire --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin squire \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/squire

COPY --from=builder /opt/venv /opt/venv

# The root filesystem is read-only in Kubernetes: no .pyc writes at run time
# (pip compiled them at install), unbuffered logs straight to the collector.
# SQUIRE_HOST=0.0.0.0: reachable from outside the container. The orchestrator
# refuses plaintext on a non-loopback address (exit code 2), so the image needs
# TLS (--tls-cert/--tls-key, as deploy/k8s passes) or, where something else
# encrypts or for a local try, --insecure / SQUIRE_INSECURE=1 (docs/SECURITY.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SQUIRE_HOST=0.0.0.0 \
    SQUIRE_STATE_DIR=/var/lib/squire

# The journal (accepted directives, completed results): mount a volume here,
# or directives do not survive the container (deploy/k8s uses a PVC).
VOLUME /var/lib/squire

# 50051: gRPC (squire services, grpc.health.v1, reflection); 9464: /metrics
EXPOSE 50051 9464

USER 10001:10001

# Exec form: the orchestrator is PID 1 and receives SIGTERM itself (it stops
# taking directives and gives running ones --grace seconds).
ENTRYPOINT ["squire-orchestrator"]
