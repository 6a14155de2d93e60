"""The worker's exceptions::

    WorkerError
    ├── OpsLoadError       the ops modules fail to import or offer nothing
    ├── HelloRejected      the orchestrator refused the hello (bad or duplicate worker)
    └── LifecycleError     a method was called in a state that does not allow it

Everything else that goes wrong at run time (a broken stream, an unreachable
orchestrator, a dying pool child) is handled inside the worker, never raised.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of the worker's exceptions."""


class OpsLoadError(WorkerError):
    """The ops modules cannot be imported, or they offer no operation or monoid."""


class HelloRejected(WorkerError):
    """The orchestrator answered the hello with a status retrying cannot fix."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"the orchestrator rejected this worker ({code}): {details}")
        self.code = code
        self.details = details


class LifecycleError(WorkerError):
    """A lifecycle transition that is not allowed, e.g. ``run()`` twice."""
