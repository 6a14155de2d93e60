"""A network-free harness around the routing core.

:class:`Driver` feeds events to a :class:`Router`, calls ``validate()`` after
every step, and keeps what the instructions said in plain views: a worker's
outbox and IPC, a directive's items, credit and end, a channel's results.
A refused event raises :class:`RouterError`, as the servicers answer it.
:class:`Sim` plays the workers: each step, every worker executes what its
outbox holds and reports the results as one ``ResultsArrived``.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from squire import FatalError, Registry

from orchestrator_service._core import Router
from orchestrator_service._events import (
    ChannelClosed,
    ChannelLeased,
    ChannelReleased,
    CloseWorker,
    CreditChanged,
    DirectiveCancelled,
    DirectiveSubmitted,
    EmitItems,
    EmitResults,
    EndCall,
    EndChannel,
    Event,
    GrantCredit,
    HeartbeatReceived,
    InputEnded,
    InputsAccepted,
    Instruction,
    IpcMessage,
    Journal,
    JournalChannel,
    QueueUnserved,
    Refused,
    ResultsArrived,
    ResultsTaken,
    SendIpc,
    SendTasks,
    TasksCompleted,
    TasksPublished,
    Tick,
    WorkerConnected,
    WorkerDisconnected,
    WorkerResult,
)
from orchestrator_service._items import Items, take_bounded
from orchestrator_service._journal_records import Record
from orchestrator_service._model import (
    APPLY,
    ChannelResult,
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    PlanSpec,
    ProgressSnapshot,
    RouterConfig,
    RouterError,
    TaskRecord,
    WorkerHello,
)
from squire_kernel.serde import Serializer, decode, decode_params, encode

REGISTRY = Registry.from_modules(["squire_examples.ops"])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def hello(
    worker_id: str,
    operations: tuple[str, ...] = ("fib_at", "multiply_by", "length"),
    monoids: tuple[str, ...] = ("sum", "multiply", "concat"),
    capacity: int = 2,
    prefetch: int = 2,
) -> WorkerHello:
    return WorkerHello(worker_id, frozenset(operations), frozenset(monoids), capacity, prefetch)


def execute(task: TaskRecord, registry: Registry = REGISTRY) -> tuple[bytes, ErrorInfo | None]:
    ser = Serializer.from_wire(task.serializer)
    params = decode_params(task.params, ser)
    try:
        if task.kind == APPLY:
            value = registry.operations[task.operation](decode(task.input, ser), **params)
        else:
            values = [decode(o, ser) for o in task.operands]
            value = registry.monoids[task.operation].combine_all(values, **params)
    except FatalError as exc:
        return b"", ErrorInfo(type(exc).__name__, str(exc), strategy=int(exc.strategy))
    except Exception as exc:
        return b"", ErrorInfo(type(exc).__name__, str(exc), kind=ErrorKind.OPERATION)
    return encode(value, ser), None


def ok(task: TaskRecord, output: bytes, seconds: float = 0.0) -> WorkerResult:
    return (task.lease_id, task.task_id, output, None, 0, seconds)


def err(task: TaskRecord, error: ErrorInfo) -> WorkerResult:
    return (task.lease_id, task.task_id, b"", error, 0, 0.0)


# ------------------------------------------------------------------ views


@dataclass(eq=False)
class WorkerView:
    id: str
    outbox: list[TaskRecord] = field(default_factory=list)
    ipc: list[IpcMessage] = field(default_factory=list)
    closed: str | None = None


@dataclass(eq=False)
class DirectiveView:
    id: str
    items: Items = field(default_factory=Items)
    credit: int = 0
    end: EndCall | None = None

    @property
    def state(self) -> DirectiveState:
        return DirectiveState.RUNNING if self.end is None else self.end.state

    @property
    def failure(self) -> tuple[Code, str] | None:
        if self.end is None or self.end.code is None:
            return None
        return (self.end.code, self.end.message)

    @property
    def fold_value(self) -> bytes | None:
        return None if self.end is None else self.end.fold_value

    def take_items(self) -> Items:
        return self.items.take()


@dataclass(eq=False)
class ChannelView:
    id: str
    results: list[ChannelResult] = field(default_factory=list)  # emitted, not taken
    taken: list[ChannelResult] = field(default_factory=list)
    ended: bool = False
    released: bool = False


# ----------------------------------------------------------------- driver


class Driver:
    """The servicers' side of the core, without the network."""

    def __init__(self, config: RouterConfig | None = None, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.router = Router(config or RouterConfig(), self.clock)
        self.workers: dict[str, WorkerView] = {}
        self.directives: dict[str, DirectiveView] = {}
        self.channels: dict[str, ChannelView] = {}
        self.completed: list[TaskRecord] = []  # TasksCompleted, in order
        self.unserved: list[QueueUnserved] = []
        # Journal instructions, as an instant store would hold them: per
        # directive its plan, creation time and records, in order.
        self.journal: dict[str, tuple[PlanSpec, float, list[Record]]] = {}
        # and per leased channel its creation time and records (dropped on release)
        self.channel_journal: dict[str, tuple[float, list[Record]]] = {}
        self.steps = 0
        self._ids = itertools.count(1)

    def handle(self, *events: Event) -> list[Instruction]:
        out = self.router.handle(*events)
        self.router.validate()
        self.steps += 1
        refused = None
        for instruction in out:
            refused = self._apply(instruction) or refused
        if refused is not None:
            raise RouterError(refused.code, refused.message)
        return out

    def _apply(self, i: Instruction) -> Refused | None:
        if isinstance(i, Refused):
            return i
        if isinstance(i, SendTasks):
            self.workers[i.worker_id].outbox.extend(i.tasks)
        elif isinstance(i, SendIpc):
            self.workers[i.worker_id].ipc.append(i.ipc)
        elif isinstance(i, CloseWorker):
            self.workers[i.worker_id].closed = i.message
        elif isinstance(i, EmitItems):
            assert self.directives[i.directive_id].end is None, "items after the end"
            self.directives[i.directive_id].items.extend(i.items)
        elif isinstance(i, GrantCredit):
            assert i.count > 0
            self.directives[i.directive_id].credit += i.count
        elif isinstance(i, EndCall):
            view = self.directives[i.directive_id]
            assert view.end is None, f"directive {i.directive_id} ended twice"
            view.end = i
        elif isinstance(i, EmitResults):
            view_c = self.channels[i.channel_id]
            assert not view_c.ended, "results after the end"
            view_c.results.extend(i.results)
        elif isinstance(i, EndChannel):
            view_c = self.channels[i.channel_id]
            view_c.ended = True
            view_c.released = i.released
            if i.released:
                self.channel_journal.pop(i.channel_id, None)
        elif isinstance(i, TasksCompleted):
            self.completed.extend(i.tasks)
        elif isinstance(i, QueueUnserved):
            self.unserved.append(i)
        elif isinstance(i, Journal):
            if i.plan is not None:
                self.journal[i.directive_id] = (i.plan, i.created_at, [])
            self.journal[i.directive_id][2].extend(i.records)
        elif isinstance(i, JournalChannel):
            if i.opened:
                self.channel_journal[i.channel_id] = (i.created_at, [])
            self.channel_journal[i.channel_id][1].extend(i.records)
        else:
            raise AssertionError(f"unknown instruction {i!r}")
        return None

    # workers -----------------------------------------------------------

    def connect(self, h: WorkerHello) -> WorkerView:
        view = self.workers[h.worker_id] = self.workers.get(h.worker_id) or WorkerView(h.worker_id)
        try:
            self.handle(WorkerConnected(h))
        except RouterError:
            if h.worker_id not in self.router.workers:
                del self.workers[h.worker_id]
            raise
        return view

    def disconnect(self, worker: WorkerView) -> None:
        self.handle(WorkerDisconnected(worker.id))

    def report(self, worker: WorkerView, results: list[WorkerResult]) -> None:
        self.handle(ResultsArrived(worker.id, results))

    def heartbeat(self, worker: WorkerView) -> None:
        self.handle(HeartbeatReceived(worker.id))

    def set_window(self, worker: WorkerView, window: int) -> None:
        self.handle(CreditChanged(worker.id, window))

    def tick(self) -> None:
        self.handle(Tick())

    # directives --------------------------------------------------------

    def start(self, plan: PlanSpec) -> DirectiveView:
        view = DirectiveView(f"d{next(self._ids)}")
        self.directives[view.id] = view
        try:
            self.handle(DirectiveSubmitted(view.id, plan))
        except RouterError:
            del self.directives[view.id]
            raise
        return view

    def inputs(self, d: DirectiveView, items: list[bytes]) -> None:
        self.handle(InputsAccepted(d.id, items))

    def end_input(self, d: DirectiveView) -> None:
        self.handle(InputEnded(d.id))

    def cancel(self, d: DirectiveView) -> None:
        self.handle(DirectiveCancelled(d.id))

    def progress(self, d: DirectiveView) -> ProgressSnapshot:
        snapshot = self.router.progress(d.id)
        assert snapshot is not None
        return snapshot

    # channels ----------------------------------------------------------

    def lease(self, tenant: str = "") -> ChannelView:
        view = ChannelView(f"c{next(self._ids)}")
        self.channels[view.id] = view
        self.handle(ChannelLeased(view.id, tenant))
        return view

    def publish(self, channel_id: str, tasks: list[TaskRecord]) -> None:
        self.handle(TasksPublished(channel_id, tasks))

    def close(self, channel_id: str) -> None:
        self.handle(ChannelClosed(channel_id))

    def release(self, channel_id: str) -> None:
        self.handle(ChannelReleased(channel_id))

    def take(self, channel: ChannelView, limit: int) -> list[ChannelResult]:
        held = deque(channel.results)
        taken = take_bounded(held, limit)
        channel.results = list(held)
        channel.taken.extend(taken)
        self.handle(ResultsTaken(channel.id, len(taken)))
        return taken


# -------------------------------------------------------------------- sim


class Sim(Driver):
    """Plays the workers: each step, every worker runs what its outbox holds."""

    def __init__(
        self,
        config: RouterConfig | None = None,
        clock: Clock | None = None,
        *,
        seed: int = 0,
        execute_fn: Callable[[TaskRecord], tuple[bytes, ErrorInfo | None]] = execute,
    ) -> None:
        super().__init__(config, clock)
        self.rng = random.Random(seed)
        self.execute = execute_fn
        self.held: dict[str, list[TaskRecord]] = {}
        self.log: list[tuple[str, TaskRecord]] = []  # (worker id, task) in dispatch order
        self.max_held: dict[str, int] = {}

    def step(self, *, shuffle: bool = True, limit: int | None = None) -> int:
        """Move outboxes to the workers, run up to ``limit`` tasks per worker,
        report their results as one batch. Returns how many tasks ran."""
        ran = 0
        for worker_id in list(self.router.workers):
            view = self.workers[worker_id]
            held = self.held.setdefault(worker_id, [])
            self.log.extend((worker_id, task) for task in view.outbox)
            held.extend(view.outbox)
            view.outbox.clear()
            view.ipc.clear()
            self.max_held[worker_id] = max(self.max_held.get(worker_id, 0), len(held))
            batch = held[:] if limit is None else held[:limit]
            del held[: len(batch)]
            if shuffle:
                self.rng.shuffle(batch)
            results = []
            for task in batch:
                output, error = self.execute(task)
                results.append((task.lease_id, task.task_id, output, error, 0, 0.001))
            ran += len(results)
            if results:
                self.handle(ResultsArrived(worker_id, results))
        return ran

    def idle(self) -> bool:
        return not any(self.workers[w].outbox for w in self.router.workers)

    def run(self, max_steps: int = 100_000, **kw: Any) -> None:
        for _ in range(max_steps):
            if not self.step(**kw) and self.idle():
                return
        raise AssertionError("simulation did not settle")
