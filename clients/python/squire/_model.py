"""Plain values of the client SDK: plans, directive events, channel outcomes.

Proto messages are converted to and from these in :mod:`squire._wire` and
never reach user code. Payload values here are already decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from squire_kernel.retry import FatalStrategy
from squire_kernel.serde import Serializer

# ------------------------------------------------------------------- plans


@dataclass(frozen=True)
class MapStage:
    """Apply ``operation(item, **params)`` to every element."""

    operation: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"map({self.operation}{_describe_params(self.params)})"


@dataclass(frozen=True)
class FoldStage:
    """Reduce every element with the monoid ``monoid`` (always the last stage)."""

    monoid: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"fold({self.monoid}{_describe_params(self.params)})"


Stage: TypeAlias = MapStage | FoldStage


def _describe_params(params: Mapping[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in params.items())


@dataclass(frozen=True)
class Plan:
    """What a directive does: zero or more map stages, optionally one fold last."""

    stages: tuple[Stage, ...]
    serializer: Serializer = Serializer.JSON
    expected_items: int | None = None  # a progress hint; None = unknown
    task_timeout: float | None = None  # seconds per task; None = no limit
    detached: bool = False  # runs on when its caller leaves (see IndexedStream.submit)
    priority: int = 0  # served first within its tenant's share when higher (-1000..1000)

    def __post_init__(self) -> None:
        for stage in self.stages[:-1]:
            if isinstance(stage, FoldStage):
                raise ValueError(f"fold must be the last stage of a plan: {self.describe()}")

    @property
    def fold(self) -> FoldStage | None:
        """The final fold stage, or None for a map-only plan."""
        last = self.stages[-1] if self.stages else None
        return last if isinstance(last, FoldStage) else None

    def describe(self) -> str:
        """E.g. ``map(fib_at) -> fold(sum)``, the way ``squire status`` shows plans."""
        return " -> ".join(stage.describe() for stage in self.stages) or "identity"


# ------------------------------------------------------ directive events


@dataclass(frozen=True)
class Skipped:
    """Stands in for the value of an element that failed with FatalStrategy.IGNORE.

    A map result holds ``Skipped(index, error)`` at that index; a fold treats
    the element as ``empty()`` (which leaves the fold value unchanged).
    """

    index: int
    error: str


@dataclass(frozen=True)
class DirectiveStarted:
    """The orchestrator accepted the plan; ``directive_id`` is its routing key."""

    directive_id: str


@dataclass(frozen=True)
class ItemBatch:
    """Map results in completion order: ``(index, value or Skipped)`` pairs."""

    items: tuple[tuple[int, Any], ...]


@dataclass(frozen=True)
class Progress:
    """How far a directive got. ``total`` is 0 while the input is still open."""

    received: int = 0  # input elements the orchestrator received
    completed: int = 0  # elements through every map stage (or skipped)
    skipped: int = 0
    total: int = 0
    queued: int = 0  # tasks waiting for a worker
    leased: int = 0  # tasks at workers (executing or buffered there)
    retries: int = 0
    tasks_done: int = 0  # every finished task, fold combines included
    # What the directive waits for, if anything: "waiting for a worker that
    # offers operation 'fib_att' (fails after 30 s); did you mean 'fib_at'?"
    waiting: str = ""

    @property
    def running(self) -> int:
        """Deprecated name of :attr:`leased` (tasks at workers, not only executing)."""
        return self.leased


@dataclass(frozen=True)
class FoldValue:
    """The result of a plan that ends in a fold."""

    value: Any


DirectiveEvent: TypeAlias = DirectiveStarted | ItemBatch | Progress | FoldValue


# ------------------------------------------------------- channel outcomes


@dataclass(frozen=True)
class TaskFailure:
    """Why a task failed: data reported by the worker, never an exception object.

    ``kind`` is the lower-case ErrorKind name: ``operation``, ``bad_payload``,
    ``unknown_operation``, ``aborted``, ``returned``, ``crashed`` or ``timeout``.
    """

    error_type: str
    message: str
    kind: str = "operation"
    strategy: FatalStrategy = FatalStrategy.TERMINATE
    retries_exhausted: bool = False
    retries: int = 0


@dataclass(frozen=True)
class TaskOutcome:
    """The result of one task published on a channel.

    Exactly one of ``value`` (decoded output, when ``ok``) and ``error`` is
    meaningful; ``metadata`` is the opaque bytes the task was published with.
    """

    task_id: int
    metadata: bytes = b""
    value: Any = None
    error: TaskFailure | None = None
    attempt: int = 1
    execution_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None
