"""The Squire orchestrator service: the Runtime.

- ``Router`` (``_core``): the sans-io routing core,
  ``handle(*events) -> instructions`` (``_events``): workers, leases,
  channels, credit-based dispatch, and ``Directive`` (``_directive``), the
  server-side evaluation of map, fold and chains.
- ``Hub`` (``_hub``) executes the instructions on the streams of the
  ``grpc.aio`` servicers (``_servicer``, ``_session``).
- ``Orchestrator`` (``_server``): the process around them.
"""

from __future__ import annotations

from orchestrator_service._core import Router
from orchestrator_service._model import FoldStage, MapStage, PlanSpec, RouterConfig

__all__ = ["FoldStage", "MapStage", "PlanSpec", "Router", "RouterConfig"]
