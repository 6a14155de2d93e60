"""What the routing core takes in (events) and gives out (instructions).

The servicers translate wire messages into events, call
``Router.handle(*events)``, and execute the instructions it returns: they
write streams, wake calls, and record metrics. The core never calls back
into them. A request the core refuses comes back as a :class:`Refused`
instruction, with nothing else changed by that event.

Events are what a journal records: replaying them into a new core in order
rebuilds its state (ids come in the events, time from the injected clock).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator_service._items import Items
from orchestrator_service._journal_records import Record
from orchestrator_service._model import (
    ChannelResult,
    Code,
    DirectiveState,
    ErrorInfo,
    PlanSpec,
    ProgressSnapshot,
    TaskRecord,
    TenantShare,
    WorkerHello,
)

# A worker's report for one task, as the core takes it on the hot path (a
# tuple, not an object): (lease id, task id, output, error or None for
# ExecutionOk, retries, execution seconds). The lease id names the dispatch
# (unique per orchestrator); the task id must match it.
WorkerResult = tuple[int, int, bytes, ErrorInfo | None, int, float]

# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class WorkerConnected:
    hello: WorkerHello


@dataclass(frozen=True, slots=True)
class WorkerDisconnected:
    """The worker's stream ended: its leases go back to the queues."""

    worker_id: str


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    worker_id: str
    executing: int = 0  # what the worker reports: tasks executing now
    buffered: int = 0  # and tasks waiting for a free slot there


@dataclass(frozen=True, slots=True)
class CreditChanged:
    worker_id: str
    window: int


@dataclass(frozen=True, slots=True)
class ResultsArrived:
    worker_id: str
    results: Sequence[WorkerResult]


@dataclass(frozen=True, slots=True)
class ChannelLeased:
    channel_id: str
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class TasksPublished:
    """Client tasks for an external channel; all or none are accepted. A task
    whose id the channel already has is a duplicate: it is left out."""

    channel_id: str
    tasks: list[TaskRecord]


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    """The channel's sender is done: its result stream ends once drained."""

    channel_id: str


@dataclass(frozen=True, slots=True)
class ChannelReleased:
    channel_id: str


@dataclass(frozen=True, slots=True)
class ResultsTaken:
    """The servicer handed ``count`` of a channel's results to its subscriber."""

    channel_id: str
    count: int


@dataclass(frozen=True, slots=True)
class DirectiveSubmitted:
    directive_id: str
    plan: PlanSpec


@dataclass(frozen=True, slots=True)
class InputsAccepted:
    directive_id: str
    items: list[bytes]


@dataclass(frozen=True, slots=True)
class InputEnded:
    directive_id: str


@dataclass(frozen=True, slots=True)
class DirectiveCancelled:
    """The caller cancelled or went away."""

    directive_id: str


@dataclass(frozen=True, slots=True)
class DirectiveRestored:
    """A directive read back from the journal at startup: its plan and the
    records it journaled, in order. It goes on where it stood; only its tasks
    without a journaled outcome run again."""

    directive_id: str
    plan: PlanSpec
    records: list[Record]
    created_at: float


@dataclass(frozen=True, slots=True)
class ChannelRestored:
    """A leased channel read back from the journal at startup: its records,
    in order. Its tasks without a journaled result are queued again."""

    channel_id: str
    records: list[Record]
    created_at: float
    tenant: str = ""


@dataclass(frozen=True, slots=True)
class TenantsChanged:
    """The tenants file was (re)loaded: every tenant's weight and quotas.
    A tenant not named has weight 1 and no quotas."""

    shares: Mapping[str, TenantShare]


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: expire silent workers and queues nobody serves."""


@dataclass(frozen=True, slots=True)
class DrainRequested:
    grace_seconds: float


@dataclass(frozen=True, slots=True)
class AcceptingStopped:
    """Shutting down: new channels and directives are refused."""


Event = (
    WorkerConnected | WorkerDisconnected | HeartbeatReceived | CreditChanged | ResultsArrived
    | ChannelLeased | TasksPublished | ChannelClosed | ChannelReleased | ResultsTaken
    | DirectiveSubmitted | InputsAccepted | InputEnded | DirectiveCancelled
    | DirectiveRestored | ChannelRestored | TenantsChanged | Tick | DrainRequested
    | AcceptingStopped
)

# ------------------------------------------------------------ instructions


@dataclass(frozen=True, slots=True)
class IpcMessage:
    kind: str  # "execution_failed" | "abort" | "abort_all" | "drain"
    routing_key: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    """The event was refused as a whole; answer its call with ``code``."""

    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class SendTasks:
    worker_id: str
    tasks: list[TaskRecord]


@dataclass(frozen=True, slots=True)
class SendIpc:
    worker_id: str
    ipc: IpcMessage


@dataclass(frozen=True, slots=True)
class CloseWorker:
    """The core gave up on the worker (silent too long): end its stream."""

    worker_id: str
    message: str


@dataclass(frozen=True, slots=True)
class EmitItems:
    directive_id: str
    items: Items


@dataclass(frozen=True, slots=True)
class GrantCredit:
    """The directive takes ``count`` more input elements."""

    directive_id: str
    count: int


@dataclass(frozen=True, slots=True)
class EndCall:
    """The directive finished; its items were all emitted before this."""

    directive_id: str
    state: DirectiveState
    code: Code | None  # None: OK
    message: str
    fold_value: bytes | None
    progress: ProgressSnapshot
    duration: float
    emitted: int = 0  # items it emitted in all (values and skipped)


@dataclass(frozen=True, slots=True)
class EmitResults:
    channel_id: str
    results: list[ChannelResult]


@dataclass(frozen=True, slots=True)
class EndChannel:
    """No more results: the channel drained or was released."""

    channel_id: str
    released: bool


@dataclass(frozen=True, slots=True)
class QueueUnserved:
    """Tasks of ``queue`` wait and no connected worker offers it (log it)."""

    queue: str
    message: str


@dataclass(frozen=True, slots=True)
class TasksCompleted:
    """Tasks that reached their outcome at ``now`` (metrics)."""

    tasks: list[TaskRecord]
    now: float


@dataclass(frozen=True, slots=True)
class Journal:
    """Commit these records of a directive (see ``_journal_records``) before
    any later instruction for it reaches its caller. ``plan`` is set on the
    first one of a new directive (the header of its journal)."""

    directive_id: str
    records: list[Record]
    received: int  # input elements the directive holds after these records
    input_closed: bool = False  # and whether its input has ended
    plan: PlanSpec | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class JournalChannel:
    """Commit these records of a leased channel before any later instruction
    for it (its results, its end) reaches its subscriber; ``opened`` on the
    first one (the lease itself)."""

    channel_id: str
    records: list[Record]
    opened: bool = False
    created_at: float = 0.0
    tenant: str = ""  # with ``opened``: whose channel it is


Instruction = (
    Refused | SendTasks | SendIpc | CloseWorker | EmitItems | GrantCredit | EndCall
    | EmitResults | EndChannel | QueueUnserved | TasksCompleted | Journal | JournalChannel
)
