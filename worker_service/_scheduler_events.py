"""What goes into the worker's scheduler and what comes out of it.

Events are what happened (the stream delivered tasks or worker IPC, the
executor finished a batch, a pool crashed, time passed); instructions are
what the scheduler wants done (run a batch, send results, send credit, wake
it up later, signal running tasks to abort, close the stream). Both are
plain values: no proto message, no future, no clock reading.

The scheduler hands tasks (``TaskSpec``) to the executor inside ``Run`` and
gets the same objects back inside ``ExecutionFinished`` / ``PoolCrashed``:
a task's identity (not its task id) ties a completion to its run.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker_service._model import Failure, Outcome, TaskSpec

# (task, what one run produced, seconds that run took)
Executed = tuple[TaskSpec, Outcome, float]
# (task, its final outcome): one result on the wire
Report = tuple[TaskSpec, bytes | Failure]


class Phase(enum.Enum):
    RUNNING = "running"    # taking tasks
    DRAINING = "draining"  # credit 0 sent: finishing what runs, returning the rest
    CLOSED = "closed"      # drained: the stream is being closed, nothing more is sent
    BROKEN = "broken"      # the stream is gone: everything was forgotten


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    capacity: int  # executor slots: tasks running at once
    window: int    # the credit window the orchestrator should respect


@dataclass(slots=True)
class Holdover:
    """What a broken stream leaves to the next one: tasks still running (and
    since when), results not yet sent, and the slots of runs already
    reported (timed out, handed back) that have not ended. The next stream
    names the first two in its hello and reports them, so a restarted
    orchestrator adopts their results instead of running them again."""

    running: dict[TaskSpec, float] = field(default_factory=dict)
    reports: list[Report] = field(default_factory=list)
    detached: set[TaskSpec] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.running or self.reports or self.detached)


# ----------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class TasksReceived:
    tasks: Sequence[TaskSpec]


@dataclass(frozen=True, slots=True)
class ExecutionFinished:
    """The executor ran these tasks once each (a batch, or a single run).

    ``capacity``: the executor's capacity from now on, when it changes with
    what it learns (the process executor's grows with how cheap tasks are).
    ``returned``: tasks it hands back without having run them (no child had
    room, or the child that held them died before their results came back):
    they go back to the head of the FIFO, without blame.
    """

    results: Sequence[Executed]
    capacity: int | None = None
    returned: Sequence[TaskSpec] = ()


@dataclass(frozen=True, slots=True)
class PoolCrashed:
    """A process pool broke under these tasks, with the seconds each had run.

    ``shared``: it was running more than one task when it broke, so any of
    them may have killed it.
    """

    crashed: Sequence[tuple[TaskSpec, float]]
    shared: bool
    error_type: str


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: retries may be due, runs past their timeout, the drain over."""


@dataclass(frozen=True, slots=True)
class AbortReceived:
    """Worker IPC: these routing keys were aborted (or their execution failed)."""

    keys: Sequence[str]


@dataclass(frozen=True, slots=True)
class AbortAllReceived:
    """Worker IPC: abort every routing key held."""


@dataclass(frozen=True, slots=True)
class DrainRequested:
    grace: float


@dataclass(frozen=True, slots=True)
class DrainExpired:
    """The drain grace was cut short: hand back what still runs."""


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """The stream is gone: forget everything, send nothing more."""


Event = (
    TasksReceived | ExecutionFinished | PoolCrashed | Tick | AbortReceived | AbortAllReceived
    | DrainRequested | DrainExpired | StreamBroken
)


# ----------------------------------------------------------- instructions

@dataclass(frozen=True, slots=True)
class Run:
    """Hand these tasks to the executor (the retry number is ``task.retries + 1``)."""

    tasks: Sequence[TaskSpec]


@dataclass(frozen=True, slots=True)
class SendResults:
    """Report these tasks, in one ResultBatch (split only by its size limit)."""

    results: Sequence[Report]


@dataclass(frozen=True, slots=True)
class SendCredit:
    window: int


@dataclass(frozen=True, slots=True)
class CancelRunning:
    """Set the abort signal of these running tasks (cooperative cancellation)."""

    tasks: Sequence[TaskSpec]


@dataclass(frozen=True, slots=True)
class Wake:
    """Deliver a ``Tick`` at clock time ``at`` instead of at the time asked for
    before; None: no wake-up is needed. A ``Tick`` spends the wake-up."""

    at: float | None


@dataclass(frozen=True, slots=True)
class CloseStream:
    """The drain is over: flush what was sent, then half-close the stream."""


Instruction = Run | SendResults | SendCredit | CancelRunning | Wake | CloseStream
