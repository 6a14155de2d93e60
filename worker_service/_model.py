"""Plain values the worker passes around internally.

Proto messages are converted to these in ``_wire`` and never reach the
scheduling code. They are deliberately lean (slots, no validation): a worker
handles tens of thousands of tasks per second, so per-task objects stay small.
``Failure`` and ``Transient`` also cross the process-pool boundary, which is
why they hold only strings, numbers and enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from squire_kernel.retry import FatalStrategy

APPLY = 0  # squire.api.v1.TaskKind
COMBINE = 1


class ErrorKind(enum.IntEnum):
    """Wire values equal ``squire.api.v1.ErrorKind``."""

    OPERATION = 0
    BAD_PAYLOAD = 1
    UNKNOWN_OPERATION = 2
    ABORTED = 3
    RETURNED = 4
    CRASHED = 5
    TIMEOUT = 6


# Per-task values are plain slotted dataclasses: a frozen dataclass's
# __init__ goes through object.__setattr__ and costs twice as much.
@dataclass(slots=True, eq=False)
class TaskSpec:
    """One task: as received from the orchestrator, then what the worker
    learned running it (only the scheduler changes those last fields).

    Its identity is what ties a completion to its run, so ``eq=False``.
    """

    routing_key: str
    task_id: int
    operation: str
    kind: int
    params: bytes
    input: bytes
    operands: tuple[bytes, ...]
    serializer: int
    lease_id: int
    timeout_seconds: float
    retries: int = 0
    elapsed: float = 0.0  # seconds of execution, over every run
    # It ran in a process pool that broke under several tasks at once: it
    # runs again alone before anyone is blamed.
    suspect: bool = False

    def log_fields(self) -> dict[str, object]:
        """Structured log fields of the task (see squire_kernel.logs)."""
        return {
            "routing_key": self.routing_key, "task_id": self.task_id, "operation": self.operation,
        }


@dataclass(frozen=True, slots=True)
class Failure:
    """A final failure, reported as ``ExecutionErr``."""

    kind: ErrorKind
    error_type: str
    message: str
    strategy: FatalStrategy = FatalStrategy.TERMINATE
    retries_exhausted: bool = False
    retries: int = 0


@dataclass(frozen=True, slots=True)
class Transient:
    """The operation raised ``TransientError``: the worker may run it again.

    ``delay`` is what the error's retry strategy says for the next retry:
    seconds to wait, or None when retries are exhausted.
    """

    error_type: str
    message: str
    delay: float | None


# What one execution of a task produces: the encoded output on success.
Outcome = bytes | Failure | Transient


# Failures the worker itself decides (not the operation).
RETURNED = Failure(ErrorKind.RETURNED, "Returned", "the worker is draining")


def aborted_failure(routing_key: str) -> Failure:
    return Failure(ErrorKind.ABORTED, "Aborted", f"routing key {routing_key!r} was aborted")


def timed_out(task: TaskSpec) -> Failure:
    return Failure(
        ErrorKind.TIMEOUT, "TimeoutError", f"ran longer than {task.timeout_seconds:g}s",
    )


def exhausted(transient: Transient, retries: int) -> Failure:
    """A transient failure with no retry left: fatal, with the default strategy."""
    return Failure(
        ErrorKind.OPERATION, transient.error_type, transient.message, FatalStrategy.TERMINATE,
        retries_exhausted=True, retries=retries,
    )


def crashed(error_type: str) -> Failure:
    return Failure(
        ErrorKind.CRASHED, error_type, "the executor process died while running the task",
    )
