"""The executors' side of the Executor interface: batches in, completions as
events, slots, abort signals; the process executor's capacity and what it
hands back unstarted."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_service._depth import MAX_DEPTH
from worker_service._executor import InlineExecutor, ThreadExecutor
from worker_service._model import ErrorKind, TaskSpec
from worker_service._process import ProcessExecutor
from worker_service._runtime import load_registry
from worker_service._scheduler_events import ExecutionFinished, PoolCrashed
from worker_service._wire import tasks_from_wire

from .fakes import OPS, task, wait_for
from .ops_for_tests import GATE

Events = list[ExecutionFinished | PoolCrashed]


def spec(task_id: int, operation: str = "echo", value: bytes = b"1") -> TaskSpec:
    return TaskSpec("rk", task_id, operation, 0, b"", value, (), 0, task_id, 0.0)


def ended(events: Events) -> list[TaskSpec]:
    return [t for e in events if isinstance(e, ExecutionFinished) for t, _, _ in e.results]


def test_the_inline_executor_reports_a_batch_in_one_event() -> None:
    executor = InlineExecutor(load_registry((OPS,)), capacity=8)
    events: Events = []
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


async def test_the_thread_executor_hands_runs_that_end_together_over_in_one_event() -> None:
    executor = ThreadExecutor(load_registry((OPS,)), 4)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        tasks = [spec(i, "gated", b"%d" % i) for i in range(4)]
        executor.submit(tasks)
        assert executor.busy == 4 and executor.capacity == 4
        await wait_for(lambda: GATE.started == 4, what="four gated runs")
        executor.abort(tasks[:1])  # a cooperative run sees its signal
        await wait_for(lambda: ended(events) == tasks[:1], what="the aborted run")
        GATE.release.set()
        await wait_for(lambda: executor.busy == 0, what="all slots free")
        assert sorted(t.task_id for t in ended(events)) == [0, 1, 2, 3]
        [(_, aborted, _)] = events[0].results  # type: ignore[union-attr]
        assert aborted == b'"aborted"'
        assert len(events) <= 4
    finally:
        await executor.close(1.0)


async def test_process_capacity_grows_with_cheap_tasks_and_results_come_in_batches() -> None:
    executor = ProcessExecutor([OPS], 2)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        # Nothing learned yet: one task per child, as before batching.
        assert executor.capacity == 2
        executor.submit(tasks_from_wire([task("echo", 0), task("echo", 1)]))
        await wait_for(lambda: executor.busy == 0, 10, "the first tasks")
        capacity = executor.capacity
        assert 2 < capacity <= 2 * MAX_DEPTH
        assert events[-1].capacity == capacity  # type: ignore[union-attr]
        tasks = tasks_from_wire([task("echo", i, task_id=i) for i in range(capacity)])
        events.clear()
        executor.submit(tasks)
        await wait_for(lambda: executor.busy == 0, 10, "a full batch")
        got = ended(events)
        assert sorted(t.task_id for t in got) == list(range(capacity))
        assert len(events) < capacity / 4, "results came back one by one"
        outputs = {t.task_id: o for e in events for t, o, _ in e.results}  # type: ignore[union-attr]
        assert outputs[7] == b"7"
    finally:
        await executor.close(1.0)


async def test_a_task_no_child_has_room_for_comes_back_unstarted(tmp_path: Path) -> None:
    executor = ProcessExecutor([OPS], 2)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        # "slow" was never seen: it counts as a child's whole queue.
        markers = [tmp_path / f"m{i}" for i in range(3)]
        slow = tasks_from_wire([task("slow", {"marker": str(m), "max": 30}, task_id=i)
                                for i, m in enumerate(markers)])
        executor.submit(slow)
        [event] = events
        assert isinstance(event, ExecutionFinished) and not event.results
        assert list(event.returned) == slow[2:]
        assert event.capacity == executor.busy == 2
        await wait_for(lambda: markers[0].exists() and markers[1].exists(), 10, "both running")
        executor.abort(slow[:2])
        await wait_for(lambda: len(ended(events)) == 2, 10, "both aborted")
        assert {o for e in events for _, o, _ in e.results} == {b'"aborted"'}  # type: ignore[union-attr]
    finally:
        await executor.close(1.0)


async def test_a_task_aborted_before_it_starts_is_not_run(tmp_path: Path) -> None:
    executor = ProcessExecutor([OPS], 1)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        warm = tasks_from_wire([task("slow", {"max": 0})])
        executor.submit(warm)  # now "slow" is known to be quick: two fit in the child
        await wait_for(lambda: executor.busy == 0, 10, "the warm-up")
        events.clear()
        first, second = tmp_path / "first", tmp_path / "second"
        slow = tasks_from_wire([task("slow", {"marker": str(first), "max": 30}, task_id=1),
                                task("slow", {"marker": str(second), "max": 30}, task_id=2)])
        executor.submit(slow)
        assert executor.busy == 2, "both queued in the one child"
        await wait_for(first.exists, 10, "the first running")
        executor.abort(slow)
        await wait_for(lambda: executor.busy == 0, 10, "both ended")
        outcomes = {t.task_id: o for e in events for t, o, _ in e.results}  # type: ignore[union-attr]
        assert outcomes[1] == b'"aborted"'  # it ran, and saw its signal
        assert getattr(outcomes[2], "kind", None) == ErrorKind.ABORTED  # never started
        assert not second.exists()
    finally:
        await executor.close(1.0)


async def test_a_queue_behind_a_task_slower_than_estimated_goes_back(tmp_path: Path) -> None:
    executor = ProcessExecutor([OPS], 1)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        for warm in tasks_from_wire([task("echo", 0), task("slow", {"max": 0})]):
            executor.submit([warm])  # both now known to be quick
            await wait_for(lambda: executor.busy == 0, 10, "the warm-up")
        events.clear()
        marker = tmp_path / "m"
        tasks = tasks_from_wire([task("slow", {"marker": str(marker), "max": 30}, task_id=100)]
                                + [task("echo", i, task_id=i) for i in range(10)])
        executor.submit(tasks)
        assert executor.busy == 11 and not events
        # The slow run turns out long: its queue is withdrawn, not left waiting.
        [event] = await wait_for(lambda: events, 5, "the queue withdrawn")
        assert isinstance(event, ExecutionFinished) and not event.results
        assert list(event.returned) == tasks[1:] and executor.busy == 1
        assert event.capacity == 1  # nothing more goes behind it now
        executor.abort(tasks[:1])
        await wait_for(lambda: executor.busy == 0, 10, "the slow one aborted")
    finally:
        await executor.close(1.0)


async def test_the_thread_executor_takes_back_a_queue_behind_slow_runs() -> None:
    executor = ThreadExecutor(load_registry((OPS,)), 1)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        for warm in (spec(0, "gated", b"0"), spec(1)):
            GATE.release.set()
            executor.submit([warm])  # both now known to be quick
            await wait_for(lambda: executor.busy == 0, what="the warm-up")
        GATE.reset()
        events.clear()
        tasks = [spec(10, "gated", b"10"), *(spec(i) for i in range(11, 16))]
        executor.submit(tasks)
        assert executor.busy == 6 and not events
        [event] = await wait_for(lambda: events, 5, "the queue taken back")
        assert isinstance(event, ExecutionFinished) and not event.results
        assert list(event.returned) == tasks[1:] and executor.busy == 1
        GATE.release.set()
        await wait_for(lambda: executor.busy == 0, what="the gated run")
        assert ended(events) == tasks[:1]
    finally:
        await executor.close(1.0)


@pytest.mark.parametrize("learned", [0.05, 0.0], ids=["expected-long", "turns-long"])
async def test_a_result_does_not_wait_for_the_long_run_after_it(
    tmp_path: Path, learned: float
) -> None:
    executor = ProcessExecutor([OPS], 1)
    events: Events = []
    executor.attach(events.append)
    await executor.start()
    try:
        for warm in tasks_from_wire([task("echo", 0), task("slow", {"max": learned})]):
            executor.submit([warm])
            await wait_for(lambda: executor.busy == 0, 10, "the warm-up")
        events.clear()
        quick, long = tasks_from_wire([task("echo", 1, task_id=1),
                                       task("slow", {"max": 30}, task_id=2)])
        executor.submit([quick, long])
        assert executor.busy == 2, "both in the one child"
        # Sent before the long run (expected long), or on the stall signal.
        await wait_for(lambda: ended(events) == [quick], 3, "the quick result")
        assert executor.busy == 1
        executor.abort([long])
        await wait_for(lambda: executor.busy == 0, 10, "the long run aborted")
    finally:
        await executor.close(1.0)
