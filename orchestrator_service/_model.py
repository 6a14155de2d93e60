"""Plain values of the routing core. Proto messages are converted to and
from these at the servicer edge and never reach the core."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

APPLY = 0  # squire.api.v1.TaskKind
COMBINE = 1

TERMINATE = 0  # squire.api.v1.FatalStrategy
IGNORE = 1


class ErrorKind(enum.IntEnum):
    """Wire values equal ``squire.api.v1.ErrorKind``."""

    OPERATION = 0
    BAD_PAYLOAD = 1
    UNKNOWN_OPERATION = 2
    ABORTED = 3
    RETURNED = 4
    CRASHED = 5
    TIMEOUT = 6


class Code(enum.Enum):
    """gRPC status names the core reports; the servicer maps them to grpc.StatusCode."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    UNAVAILABLE = "UNAVAILABLE"


class RouterError(Exception):
    """A request the core refuses: ``code`` says which gRPC status to answer."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


QueueKey = tuple[int, str]  # (task kind, operation or monoid name)


def queue_label(key: QueueKey) -> str:
    """How a queue is named in status and metrics: fold combines are marked."""
    kind, name = key
    return f"{name} (combine)" if kind == COMBINE else name


@dataclass(slots=True, eq=False)
class TaskRecord:
    """One task as the orchestrator tracks it from publish to result.

    Built once per task on the hot path: pass the fields positionally there
    (keyword arguments make ``__init__`` twice as slow, see bench/README.md).
    """

    routing_key: str
    task_id: int
    operation: str
    kind: int = APPLY
    params: bytes = b""
    input: bytes = b""
    operands: Sequence[bytes] = ()
    serializer: int = 1
    metadata: bytes = b""
    timeout_seconds: float = 0.0
    attempt: int = 0
    lease_id: int = 0
    crashes: int = 0
    timeouts: int = 0
    published_at: float = 0.0
    # Directive bookkeeping (not on the wire): map stage and element index,
    # or, for a fold combine (stage -1), the range [index, end).
    stage: int = 0
    index: int = 0
    end: int = 0

    @property
    def queue_key(self) -> QueueKey:
        return (self.kind, self.operation)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    error_type: str
    message: str
    strategy: int = TERMINATE
    retries_exhausted: bool = False
    retries: int = 0
    kind: ErrorKind = ErrorKind.OPERATION


@dataclass(frozen=True, slots=True)
class ChannelResult:
    """A result as delivered to a channel's subscriber."""

    task: TaskRecord
    output: bytes
    error: ErrorInfo | None
    execution_seconds: float = 0.0


class DirectiveState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    received: int
    completed: int
    skipped: int
    total: int
    queued: int
    leased: int  # tasks at workers (executing or buffered there)
    retries: int
    tasks_done: int
    waiting: str = ""  # what the directive waits for, if anything (a worker offering X)


@dataclass(frozen=True, slots=True)
class WorkerHello:
    worker_id: str
    operations: frozenset[str]
    monoids: frozenset[str]
    capacity: int
    prefetch: int
    peer: str = ""
    version: str = ""
    held: tuple[HeldTask, ...] = ()  # tasks it holds from an earlier stream


@dataclass(frozen=True, slots=True)
class HeldTask:
    """A task a worker still runs (or has the result of) from an earlier
    stream; see ``squire_kernel.wire.task_digest`` for ``digest``."""

    routing_key: str
    task_id: int
    lease_id: int
    digest: int


@dataclass(frozen=True, slots=True)
class MapStage:
    operation: str
    params: bytes = b""

    def describe(self) -> str:
        return f"map({self.operation})"


@dataclass(frozen=True, slots=True)
class FoldStage:
    """The last stage of a plan: a tree reduction with ``monoid``."""

    monoid: str
    params: bytes = b""

    def describe(self) -> str:
        return f"fold({self.monoid})"


Stage = MapStage | FoldStage


@dataclass(frozen=True, slots=True)
class PlanSpec:
    stages: tuple[Stage, ...]
    serializer: int = 1
    expected_items: int = 0
    task_timeout_seconds: float = 0.0
    detached: bool = False  # runs on when its caller leaves; attached later by id
    tenant: str = ""  # whose it is (``_tenants``); "" without a tenants file
    priority: int = 0  # served first within its tenant's share when higher

    @property
    def maps(self) -> tuple[MapStage, ...]:
        return tuple(stage for stage in self.stages if isinstance(stage, MapStage))

    @property
    def fold(self) -> FoldStage | None:
        last = self.stages[-1] if self.stages else None
        return last if isinstance(last, FoldStage) else None

    def describe(self) -> str:
        return " -> ".join(stage.describe() for stage in self.stages)


@dataclass(frozen=True, slots=True)
class TenantShare:
    """What the core enforces for one tenant (from the tenants file)."""

    weight: int = 1  # its share of the workers' slots, against the other tenants'
    max_directives: int | None = None  # running at once
    max_queued_tasks: int | None = None  # queued at once: publishing and input credit wait


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Tunables of the routing core (all seconds unless named otherwise)."""

    lease_timeout: float = 10.0  # a worker silent this long loses its tasks
    heartbeat_interval: float = 1.0  # what workers are told to send
    no_worker_timeout: float = 30.0  # tasks nobody offers fail after this
    poison_threshold: int = 3  # a task that crashed its worker this often fails
    max_timeouts: int = 3  # a task that timed out this often fails
    max_queued_per_channel: int = 10_000  # publishing waits past this
    # queued + in flight + results not yet taken; publishing past this fails
    max_pending_per_channel: int = 100_000
    directive_window: int = 8_192  # elements a directive keeps in its pipeline
    fairness_quantum: int = 16  # tasks one channel gets before the next is served
    max_fold_operands: int = 64
    max_workers: int = 1_000
    journal: bool = False  # directives journal their calls (``Journal`` instructions)
    # After directives were restored, dispatch waits this long for the workers
    # that ran their tasks to reconnect and have them adopted (see _adopt).
    adoption_grace: float = 3.0


@dataclass(slots=True)
class Stats:
    """Monotonic counters; the metrics collector reads them when scraped."""

    published: int = 0
    dispatched: int = 0
    ok: int = 0
    fatal: int = 0
    ignored: int = 0
    requeued: int = 0
    returned: int = 0
    crashed: int = 0
    duplicates: int = 0
    late: int = 0  # results for a released channel
    cancelled: int = 0  # queued tasks dropped by terminate, cancel or release
    ipc_sent: int = 0
    poison: int = 0
    retried: int = 0  # transient-error retries workers made
    timeouts: int = 0  # tasks re-queued after running past their timeout
    directives_cancelled: int = 0  # directives cancelled by their caller
    adopted: int = 0  # held tasks of a reconnecting worker leased back to it
