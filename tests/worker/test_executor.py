"""The pool executors' side of the Executor interface, with futures the test
resolves by hand: slots, completions as events, a broken pool's crash
reported once with all its tasks, abort signals."""

from __future__ import annotations

import concurrent.futures
from concurrent.futures.process import BrokenProcessPool

from worker_service._executor import InlineExecutor, _PoolExecutor
from worker_service._model import Outcome, TaskSpec
from worker_service._runtime import load_registry
from worker_service._scheduler_events import ExecutionFinished, PoolCrashed

from .fakes import OPS, wait_for

Future = concurrent.futures.Future


class HandPool(_PoolExecutor):
    """Runs nothing: each task gets a future the test resolves."""

    def __init__(self, concurrency: int) -> None:
        super().__init__(concurrency)
        self.pool = concurrent.futures.Executor()
        self.futures: dict[TaskSpec, Future[Outcome]] = {}
        self.flags: list[int] = []
        self.replaced = 0

    def _start(
        self, task: TaskSpec, slot: int
    ) -> tuple[Future[Outcome], concurrent.futures.Executor]:
        cf: Future[Outcome] = Future()
        cf.set_running_or_notify_cancel()
        self.futures[task] = cf
        return cf, self.pool

    def _set_abort(self, slot: int) -> None:
        self.flags.append(slot)

    def _pool_broke(self, pool: concurrent.futures.Executor) -> None:
        if pool is self.pool:
            self.replaced += 1
            self.pool = concurrent.futures.Executor()


def spec(task_id: int, operation: str = "echo", value: bytes = b"1") -> TaskSpec:
    return TaskSpec("rk", task_id, operation, 0, b"", value, (), 0, task_id, 0.0)


async def _started(concurrency: int) -> tuple[HandPool, list[ExecutionFinished | PoolCrashed]]:
    executor = HandPool(concurrency)
    events: list[ExecutionFinished | PoolCrashed] = []
    executor.attach(events.append)
    await executor.start()
    return executor, events


async def test_each_run_comes_back_as_an_event_and_frees_its_slot() -> None:
    executor, events = await _started(2)
    a, b = spec(1), spec(2)
    executor.submit([a, b])
    assert executor.busy == 2 and executor.capacity == 2
    executor.futures[b].set_result(b"two")
    [event] = await wait_for(lambda: events, what="b's event")
    assert isinstance(event, ExecutionFinished)
    [(task, outcome, seconds)] = event.results
    assert (task, outcome) == (b, b"two") and seconds >= 0
    assert executor.busy == 1
    executor.futures[a].set_exception(RuntimeError("pickling failed"))
    await wait_for(lambda: len(events) == 2, what="a's event")
    assert isinstance(events[1], ExecutionFinished)
    [(task, failure, _)] = events[1].results
    assert task is a and getattr(failure, "error_type", None) == "RuntimeError"
    assert executor.busy == 0


async def test_a_broken_pool_is_reported_once_with_all_its_tasks() -> None:
    executor, events = await _started(4)
    a, b, c = spec(1), spec(2), spec(3)
    executor.submit([a, b, c])
    executor.futures[a].set_exception(BrokenProcessPool("a child died"))
    executor.futures[c].set_exception(BrokenProcessPool("a child died"))
    await wait_for(lambda: executor.replaced, what="the pool replaced")
    late = spec(4)
    executor.submit([late])  # in the new pool: not part of the crash
    assert not events and executor.busy == 4  # a crash holds its slots until reported
    # b had ended well just before the break: it is reported as it ended,
    # and, being the last run of the broken pool, lets the crash out.
    executor.futures[b].set_result(b"ok")
    await wait_for(lambda: len(events) == 2, what="b and the crash")
    finished, crash = events
    assert isinstance(finished, ExecutionFinished) and finished.results[0][0] is b
    assert isinstance(crash, PoolCrashed)
    assert [t for t, _ in crash.crashed] == [a, c]
    assert crash.shared and crash.error_type == "BrokenProcessPool"
    assert executor.replaced == 1 and executor.busy == 1  # only the late task runs


async def test_a_crash_alone_is_not_shared() -> None:
    executor, events = await _started(2)
    a = spec(1)
    executor.submit([a])
    executor.futures[a].set_exception(BrokenProcessPool("a child died"))
    [crash] = await wait_for(lambda: events, what="the crash")
    assert isinstance(crash, PoolCrashed) and not crash.shared
    assert executor.busy == 0


async def test_abort_signals_only_runs_still_going_and_no_sink_drops_events() -> None:
    executor, events = await _started(2)
    a, b = spec(1), spec(2)
    executor.submit([a, b])
    executor.futures[a].set_result(b"done")
    executor.abort([a, b])  # a's slot may already serve another task: not a's flag
    assert len(executor.flags) == 1
    executor.attach(None)
    executor.futures[b].set_result(b"done")
    await wait_for(lambda: executor.busy == 0, what="both slots free")
    assert not events


def test_the_inline_executor_reports_a_batch_in_one_event() -> None:
    executor = InlineExecutor(load_registry((OPS,)), capacity=8)
    events: list[ExecutionFinished | PoolCrashed] = []
    executor.attach(events.append)
    tasks = [spec(1), spec(2, "missing"), spec(3, value=b"{oops"), spec(4)]
    executor.submit(tasks)
    [event] = events
    assert isinstance(event, ExecutionFinished)
    assert [t for t, _, _ in event.results] == tasks
    outcomes = [o for _, o, _ in event.results]
    assert outcomes[0] == outcomes[3] == b"1"
    assert [getattr(o, "error_type", None) for o in outcomes[1:3]] == [
        "UnknownOperation", "PayloadError",
    ]
    assert executor.busy == 0
