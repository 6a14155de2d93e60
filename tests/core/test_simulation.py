"""The routing core under random interleavings, with ``validate()`` after
every event batch (the Driver calls it).

Each seed plays a few hundred steps of: workers connecting, reporting some
of what they hold (values, operation errors, returns, crashes, timeouts,
aborts), reporting stale leases late, going silent, being killed; clients
submitting directives, sending inputs, cancelling, leasing channels,
publishing, taking, closing, releasing; time passing; a drain. Then every
worker turns honest and the run settles. What must hold at the end: each
directive ended exactly once, no element was emitted twice, a directive that
finished DONE emitted every element (and its fold has the right value), and
a channel delivered each task's result at most once (exactly once if it was
closed and never released).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import pytest

from orchestrator_service._adopt import digest
from orchestrator_service._events import (
    DrainRequested,
    ResultsArrived,
    TenantsChanged,
    WorkerDisconnected,
    WorkerResult,
)
from orchestrator_service._model import (
    APPLY,
    IGNORE,
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    FoldStage,
    HeldTask,
    MapStage,
    PlanSpec,
    RouterConfig,
    RouterError,
    TaskRecord,
    TenantShare,
    WorkerHello,
)
from squire_kernel.serde import decode, encode

from .sim import ChannelView, DirectiveView, Driver, execute, hello

OPS = ("fib_at", "multiply_by")
PLANS: list[tuple[tuple[MapStage | FoldStage, ...], bool]] = [  # (stages, may skip)
    ((MapStage("fib_at"),), True),
    ((MapStage("multiply_by", encode({"factor": 3})),), True),
    ((MapStage("fib_at"), MapStage("multiply_by", encode({"factor": 2}))), True),
    ((MapStage("multiply_by", encode({"factor": 2})), FoldStage("sum")), False),
    ((FoldStage("sum"),), False),
]


def expected(stages: tuple[MapStage | FoldStage, ...], x: int) -> int:
    for stage in stages:
        if isinstance(stage, MapStage):
            x = fib(x) if stage.operation == "fib_at" else x * decode(stage.params)["factor"]
    return x


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@dataclass
class Submitted:
    view: DirectiveView
    stages: tuple[MapStage | FoldStage, ...]
    may_skip: bool
    inputs: list[int] = field(default_factory=list)
    ended_input: bool = False


@dataclass
class Published:
    view: ChannelView
    task_ids: set[int] = field(default_factory=set)
    closed: bool = False
    released: bool = False


# Work of several tenants, weighted 1, 1 and 3: dispatch shares the workers
# between them by weight (and "" is work of no tenant).
TENANTS = ("", "t1", "t2", "t3")
SHARES = {"t1": TenantShare(weight=1), "t2": TenantShare(weight=1, max_queued_tasks=30),
          "t3": TenantShare(weight=3)}


class Chaos:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.d = Driver(RouterConfig(
            lease_timeout=5, no_worker_timeout=10_000, poison_threshold=3, max_timeouts=2,
            directive_window=40, max_fold_operands=3, fairness_quantum=4,
            max_queued_per_channel=10_000,
        ))
        self.d.handle(TenantsChanged(SHARES))
        # what each connected worker holds: (lease id, task id, task) at dispatch
        self.held: dict[str, list[tuple[int, int, TaskRecord]]] = {}
        self.stale: list[tuple[str, int, int, TaskRecord]] = []  # for late reports
        self.directives: list[Submitted] = []
        self.channels: list[Published] = []
        self.names = 0
        self.task_ids = 0

    # --------------------------------------------------------------- plumbing

    def collect(self) -> None:
        """Move what the core sent into the workers' hands."""
        for worker_id in list(self.d.router.workers):
            view = self.d.workers[worker_id]
            self.held.setdefault(worker_id, []).extend(
                (t.lease_id, t.task_id, t) for t in view.outbox
            )
            view.outbox.clear()
        for worker_id in list(self.held):
            if worker_id not in self.d.router.workers:  # closed by the core
                self.forget(worker_id)

    def forget(self, worker_id: str) -> None:
        for lease_id, task_id, task in self.held.pop(worker_id, []):
            self.stale.append((worker_id, lease_id, task_id, task))

    def rejoin(self, worker_id: str, base: WorkerHello) -> None:
        """``worker_id``'s stream broke; it reconnects naming what it holds."""
        held = self.held.get(worker_id, [])
        refs = tuple(HeldTask(t.routing_key, task_id, lease_id, digest(t))
                     for lease_id, task_id, t in held)
        try:
            self.d.connect(dataclasses.replace(base, held=refs))
        except RouterError as exc:  # draining, or its old stream is still there
            assert exc.code in (Code.UNAVAILABLE, Code.ALREADY_EXISTS), exc
            self.forget(worker_id)

    def outcome(self, task: TaskRecord, honest: bool) -> tuple[bytes, ErrorInfo | None]:
        roll = 1.0 if honest else self.rng.random()
        if roll < 0.03:
            return b"", ErrorInfo("Returned", "draining", kind=ErrorKind.RETURNED)
        if roll < 0.05:
            return b"", ErrorInfo("BrokenProcessPool", "child died", kind=ErrorKind.CRASHED)
        if roll < 0.06:
            return b"", ErrorInfo("TaskTimeout", "too slow", kind=ErrorKind.TIMEOUT)
        if roll < 0.07:
            return b"", ErrorInfo("Aborted", "told to", kind=ErrorKind.ABORTED)
        if roll < 0.08 and task.kind == APPLY and self.skippable(task.routing_key):
            return b"", ErrorInfo("FatalError", "skip", strategy=IGNORE)
        if roll < 0.082:
            return b"", ErrorInfo("FatalError", "always fails")
        return execute(task)

    def skippable(self, key: str) -> bool:
        return any(s.view.id == key and s.may_skip for s in self.directives) or any(
            c.view.id == key for c in self.channels
        )

    def report(self, worker_id: str, *, honest: bool = False) -> None:
        held = self.held.get(worker_id)
        if not held:
            return
        n = len(held) if honest else self.rng.randint(1, len(held))
        batch, self.held[worker_id] = held[:n], held[n:]
        self.rng.shuffle(batch)
        results: list[WorkerResult] = []
        for lease_id, task_id, task in batch:
            output, error = self.outcome(task, honest)
            results.append((lease_id, task_id, output, error, 0, 0.01))
        if not honest and self.rng.random() < 0.1:
            results.append(results[0])  # a duplicate in the same batch
        self.d.handle(ResultsArrived(worker_id, results))

    # ------------------------------------------------------------------ steps

    def step(self) -> None:
        rng, d = self.rng, self.d
        action = rng.choices(
            ["connect", "kill", "report", "late", "submit", "inputs", "end_input", "cancel",
             "lease", "publish", "take", "close", "release", "tick", "heartbeat", "credit",
             "drain", "rejoin"],
            weights=[4, 2, 30, 2, 3, 8, 3, 1, 1, 4, 3, 1, 1, 4, 4, 1, 0.2, 2],
        )[0]
        workers = list(d.router.workers)
        if action == "connect":
            self.names += 1
            ops = tuple(op for op in OPS if rng.random() < 0.8) or OPS
            d.connect(hello(f"w{self.names % 7}x{self.names}", operations=ops,
                            monoids=("sum",), capacity=rng.randint(1, 3),
                            prefetch=rng.randint(0, 3)))
        elif action == "kill" and workers:
            victim = rng.choice(workers)
            d.handle(WorkerDisconnected(victim))
            self.forget(victim)
        elif action == "report" and workers:
            self.report(rng.choice(workers))
        elif action == "late" and self.stale:
            worker_id, lease_id, task_id, task = self.stale.pop(rng.randrange(len(self.stale)))
            out, error = execute(task)
            d.handle(ResultsArrived(worker_id, [(lease_id, task_id, out, error, 0, 0.0)]))
        elif action == "submit":
            stages, may_skip = rng.choice(PLANS)
            try:
                view = d.start(PlanSpec(stages, tenant=rng.choice(TENANTS),
                                        priority=rng.choice((0, 0, 1, -1))))
            except RouterError as exc:  # no worker offers it yet, or shutting down
                assert exc.code in (Code.FAILED_PRECONDITION, Code.UNAVAILABLE), exc
                return
            self.directives.append(Submitted(view, stages, may_skip))
        elif action == "inputs":
            open_ = [s for s in self.directives if not s.ended_input and s.view.end is None]
            if open_:
                s = rng.choice(open_)
                xs = [rng.randint(0, 25) for _ in range(rng.randint(1, 12))]
                s.inputs.extend(xs)
                d.inputs(s.view, [encode(x) for x in xs])
        elif action == "end_input":
            open_ = [s for s in self.directives if not s.ended_input]
            if open_:
                s = rng.choice(open_)
                s.ended_input = True
                d.end_input(s.view)
        elif action == "cancel":
            running = [s for s in self.directives if s.view.end is None]
            if running:
                d.cancel(rng.choice(running).view)
        elif action == "lease":
            try:
                self.channels.append(Published(d.lease(rng.choice(TENANTS))))
            except RouterError as exc:
                assert exc.code is Code.UNAVAILABLE
        elif action == "publish":
            live = [c for c in self.channels if not c.closed and not c.released]
            if live:
                c = rng.choice(live)
                tasks = []
                for _ in range(rng.randint(1, 6)):
                    self.task_ids += 1
                    tasks.append(TaskRecord("", self.task_ids, rng.choice(OPS),
                                            params=encode({"factor": 2}),
                                            input=encode(rng.randint(0, 20))))
                d.publish(c.view.id, tasks)
                c.task_ids.update(t.task_id for t in tasks)
        elif action == "take":
            live = [c for c in self.channels if not c.released and c.view.results]
            if live:
                c = rng.choice(live)
                d.take(c.view, rng.randint(1, 5))
        elif action == "close":
            live = [c for c in self.channels if not c.closed and not c.released]
            if live:
                c = rng.choice(live)
                c.closed = True
                d.close(c.view.id)
        elif action == "release":
            live = [c for c in self.channels if not c.released]
            if live:
                c = rng.choice(live)
                c.released = True
                d.release(c.view.id)
        elif action == "tick":
            d.clock.now += rng.choice([0.5, 1.0, 3.0, 6.0])
            d.tick()
        elif action == "heartbeat":
            for worker_id in workers:
                d.heartbeat(d.workers[worker_id])
        elif action == "credit" and workers:
            worker_id = rng.choice(workers)
            d.set_window(d.workers[worker_id], rng.randint(0, 6))
        elif action == "drain":
            d.handle(DrainRequested(1.0))
        elif action == "rejoin" and workers:
            victim = rng.choice(workers)
            base = d.router.workers[victim].hello
            d.handle(WorkerDisconnected(victim))
            self.rejoin(victim, base)
        self.collect()

    def settle(self) -> None:
        """Every worker turns honest and a full one joins; run to the end."""
        d = self.d
        # Past any adoption grace, with every worker heard from just now.
        d.clock.now += d.router.config.adoption_grace
        for worker_id in list(d.router.workers):
            d.heartbeat(d.workers[worker_id])
        d.tick()
        d.connect(hello("final", operations=OPS, monoids=("sum",), capacity=4, prefetch=4))
        for s in self.directives:
            if not s.ended_input:
                s.ended_input = True
                d.end_input(s.view)
        for c in self.channels:
            if not c.closed and not c.released:
                c.closed = True
                d.close(c.view.id)
        for worker_id in list(d.router.workers):  # windows set to 0 would stall
            d.set_window(d.workers[worker_id], 4)
        self.collect()
        for _ in range(10_000):
            busy = [w for w in d.router.workers if self.held.get(w)]
            if not busy:
                break
            for worker_id in busy:
                self.report(worker_id, honest=True)
            self.collect()
        else:
            raise AssertionError("the run did not settle")

    # ----------------------------------------------------------------- checks

    def check(self) -> None:
        for s in self.directives:
            view = s.view
            assert view.end is not None, f"directive {view.id} never ended"
            seen = view.items.indexes + [i for i, _ in view.items.skipped]
            assert len(seen) == len(set(seen)), f"directive {view.id} emitted an index twice"
            if view.state is not DirectiveState.DONE:
                continue
            fold = isinstance(s.stages[-1], FoldStage)
            if fold:
                assert not seen
                value = decode(view.fold_value) if view.fold_value is not None else None
                assert value == sum(expected(s.stages, x) for x in s.inputs)
            else:
                assert sorted(seen) == list(range(len(s.inputs))), f"directive {view.id}"
                for index, value in zip(view.items.indexes, view.items.values, strict=True):
                    assert decode(value) == expected(s.stages, s.inputs[index])
        for c in self.channels:
            ids = [r.task.task_id for r in c.view.taken + c.view.results]
            assert len(ids) == len(set(ids)), f"channel {c.view.id} delivered a result twice"
            assert set(ids) <= c.task_ids
            if not c.released:
                assert c.view.ended and set(ids) == c.task_ids, f"channel {c.view.id}"
        assert not self.d.router.directives
        assert all(c.released or c.view.ended for c in self.channels)


STEPS = 400  # event batches per seed before the run settles


@pytest.mark.parametrize("seed", range(100))
def test_random_interleavings_keep_every_invariant(seed: int) -> None:
    chaos = Chaos(seed)
    for _ in range(2_000):
        chaos.step()
        if chaos.d.steps >= STEPS:
            break
    chaos.settle()
    chaos.check()
    assert chaos.d.steps >= STEPS
