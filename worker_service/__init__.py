"""The Squire worker service: the WorkerRuntime.

A worker connects to the orchestrator over one bidirectional stream,
advertises the operations and monoids of its ops modules, executes the tasks
it is sent without blocking its event loop (process, thread or inline
executor), reports every one exactly once, obeys worker IPC (abort, drain),
and reconnects when the stream breaks.

- ``WorkerRuntime``: ``run()``, ``request_drain()``, ``shutdown()``, ``async with``,
  ``ready`` / ``live`` for health probes.
- ``WorkerConfig``: the flags of ``squire-worker`` as a frozen value.
- ``run_worker(config)``: run one worker with SIGTERM/SIGINT draining it.
- Exceptions: ``WorkerError`` and its subclasses (tree in ``_errors``).
"""

from __future__ import annotations

from worker_service._config import ExecutorKind, LogFormat, WorkerConfig
from worker_service._errors import HelloRejected, LifecycleError, OpsLoadError, WorkerError
from worker_service._runtime import WorkerRuntime, run_worker
from worker_service._state import WorkerState

__all__ = [
    "ExecutorKind",
    "HelloRejected",
    "LifecycleError",
    "LogFormat",
    "OpsLoadError",
    "WorkerConfig",
    "WorkerError",
    "WorkerRuntime",
    "WorkerState",
    "run_worker",
]
