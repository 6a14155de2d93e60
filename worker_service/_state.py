"""The worker's lifecycle as an explicit state machine."""

from __future__ import annotations

import enum
import logging

from worker_service._errors import LifecycleError

log = logging.getLogger("worker_service")


class WorkerState(enum.StrEnum):
    STARTING = "starting"      # created, executor not started yet
    CONNECTING = "connecting"  # no welcomed stream session (first connect or reconnect)
    RUNNING = "running"        # welcomed: taking and executing tasks
    DRAINING = "draining"      # taking nothing new, finishing or returning what it holds
    CLOSED = "closed"          # done; run() has returned or is about to


_S = WorkerState
_ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    _S.STARTING: frozenset({_S.CONNECTING, _S.DRAINING, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.RUNNING, _S.DRAINING, _S.CLOSED}),
    _S.RUNNING: frozenset({_S.CONNECTING, _S.DRAINING, _S.CLOSED}),
    _S.DRAINING: frozenset({_S.CLOSED}),
    _S.CLOSED: frozenset(),
}


class Lifecycle:
    def __init__(self) -> None:
        self.state = WorkerState.STARTING

    def to(self, new: WorkerState) -> None:
        if new not in _ALLOWED[self.state]:
            raise LifecycleError(f"a worker cannot go from {self.state} to {new}")
        log.debug("worker state %s -> %s", self.state, new)
        self.state = new
