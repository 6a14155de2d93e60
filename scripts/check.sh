#!/usr/bin/env bash
# Static checks: generated code is fresh, ruff (incl. the no-pickle rules
# S301/S302), mypy --strict over the packages, the benchmark smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/gen_proto.sh --check
ruff check squire_kernel orchestrator_service worker_service clients/python/squire examples tests bench
mypy squire_kernel orchestrator_service worker_service clients/python/squire
