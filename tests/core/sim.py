"""A network-free simulation of workers around the routing core."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from squire import FatalError, Registry

from orchestrator_service._core import Router, Worker
from orchestrator_service._model import (
    APPLY,
    ErrorInfo,
    ErrorKind,
    ResultEvent,
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


class Sim:
    """Drives workers: each step, every worker executes what its outbox holds."""

    def __init__(
        self,
        router: Router,
        *,
        seed: int = 0,
        execute_fn: Callable[[TaskRecord], tuple[bytes, ErrorInfo | None]] = execute,
    ) -> None:
        self.router = router
        self.rng = random.Random(seed)
        self.execute = execute_fn
        self.held: dict[str, list[TaskRecord]] = {}
        self.log: list[tuple[str, TaskRecord]] = []  # (worker id, task) in dispatch order
        self.max_held: dict[str, int] = {}

    def connect(self, h: WorkerHello) -> Worker:
        worker = self.router.connect_worker(h)
        self.held[worker.id] = []
        return worker

    def step(self, *, shuffle: bool = True, limit: int | None = None) -> int:
        """Move outboxes to the workers, run up to ``limit`` tasks per worker,
        report results. Returns how many tasks ran."""
        ran = 0
        for worker in list(self.router.workers.values()):
            held = self.held.setdefault(worker.id, [])
            for task in worker.outbox:
                self.log.append((worker.id, task))
            held.extend(worker.outbox)
            worker.outbox.clear()
            worker.ipc.clear()
            self.max_held[worker.id] = max(self.max_held.get(worker.id, 0), len(held))
            batch = held[:] if limit is None else held[:limit]
            del held[: len(batch)]
            if shuffle:
                self.rng.shuffle(batch)
            events = []
            outputs = []
            for task in batch:
                output, error = self.execute(task)
                # A plain success takes the servicer's fast path (an
                # OkResult tuple) or, now and then, the general one.
                if error is None and output and self.rng.random() < 0.8:
                    outputs.append((task.lease_id, task.task_id, output))
                else:
                    events.append(ResultEvent(task.task_id, task.lease_id, output, error))
            ran += len(events) + len(outputs)
            self.router.on_results(worker, events, outputs)
        return ran

    def run(self, max_steps: int = 100_000, **kw: Any) -> None:
        for _ in range(max_steps):
            if not self.step(**kw) and not any(w.outbox for w in self.router.workers.values()):
                return
        raise AssertionError("simulation did not settle")
