"""The Squire orchestrator service: the Runtime.

- ``Router`` (``_core``): the I/O-free routing core — channels, queues,
  leases, credit-based dispatch — and ``Directive`` (``_directive``), the
  server-side evaluation of map, fold and chains.
- ``Orchestrator`` (``_server``): the ``grpc.aio`` server around it.
"""

from __future__ import annotations

from orchestrator_service._core import Router
from orchestrator_service._model import PlanSpec, RouterConfig, StageSpec

__all__ = ["PlanSpec", "Router", "RouterConfig", "StageSpec"]
