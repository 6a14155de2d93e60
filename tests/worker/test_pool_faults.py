"""Process-executor faults: a child that kills itself or is killed, a worker killed outright."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from squire.api.v1 import squire_pb2 as pb

from squire_kernel.serde import decode
from worker_service import ExecutorKind, WorkerRuntime
from worker_service._executor import ProcessExecutor
from worker_service._scheduler_events import ExecutionFinished, PoolCrashed
from worker_service._wire import tasks_from_wire

from .fakes import FakeOrchestrator, config, task, wait_for

TESTS = Path(__file__).resolve().parent.parent


async def test_innocent_tasks_of_a_broken_pool_are_not_reported_crashed(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    # Regression: every task running when a child died was reported CRASHED,
    # so a task that merely shared the pool with a poison task (even one of
    # another directive) was charged and could itself be declared poison.
    cfg = config(orchestrator, executor=ExecutorKind.PROCESS, concurrency=3, prefetch=0)
    async with WorkerRuntime(cfg):
        session = await orchestrator.session()
        first, second = tmp_path / "first", tmp_path / "second"
        session.send_tasks(
            task("slow", {"marker": str(first), "max": 1.5}, key="a", task_id=1),
            task("slow", {"marker": str(second), "max": 1.5}, key="b", task_id=1),
        )
        await wait_for(lambda: first.exists() and second.exists(), 10, "both slow tasks running")
        session.send_tasks(task("crash", None, key="poison", task_id=1))
        await session.wait_results(3, timeout=20)
        assert decode(session.result(1, "a").ok.output) == "finished"
        assert decode(session.result(1, "b").ok.output) == "finished"
        err = session.result(1, "poison").err
        assert err.kind == pb.ERROR_KIND_CRASHED
        assert len(session.results) == 3  # each task reported exactly once


async def test_a_crash_alone_in_the_pool_is_reported_at_once(
    orchestrator: FakeOrchestrator,
) -> None:
    cfg = config(orchestrator, executor=ExecutorKind.PROCESS, concurrency=2, prefetch=0)
    async with WorkerRuntime(cfg):
        session = await orchestrator.session()
        session.send_tasks(task("crash", None, task_id=1))
        [result] = await session.wait_results(1, timeout=10)
        assert result.err.kind == pb.ERROR_KIND_CRASHED


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


async def test_a_dying_child_leaves_the_others_running_and_drain_kills_the_rest(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    # Each child is on its own: a crash in one neither kills nor re-runs the
    # task another runs. The drain deadline's SIGKILL still reaches a child
    # that is deaf to its abort signal.
    pids = tmp_path / "pids"
    cfg = config(
        orchestrator, executor=ExecutorKind.PROCESS, concurrency=2, prefetch=0, drain_grace=0.3
    )
    async with WorkerRuntime(cfg):
        session = await orchestrator.session()
        session.send_tasks(task("stubborn", {"pids": str(pids), "max": 120}, key="a", task_id=1))
        await wait_for(lambda: len(_pids(pids)) == 1, 10, "the stubborn task running")
        [survivor] = _pids(pids)
        session.send_tasks(task("crash", None, key="poison", task_id=1))
        [result] = await session.wait_results(1, timeout=10)
        assert (result.routing_key, result.err.kind) == ("poison", pb.ERROR_KIND_CRASHED)
        assert _pids(pids) == [survivor] and not _gone(survivor)  # neither re-run nor killed
    # The drain deadline kills the child still running past it.
    await wait_for(lambda: _gone(survivor), 10, f"child {survivor} killed at the drain deadline")
    assert session.result(1, "a").err.kind == pb.ERROR_KIND_RETURNED  # handed back, not lost


async def _executor(events: list[ExecutionFinished | PoolCrashed]) -> ProcessExecutor:
    executor = ProcessExecutor(["worker.ops_for_tests"], 2)
    executor.attach(events.append)
    await executor.start()
    return executor


async def test_closing_the_executor_kills_children_past_the_grace(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    events: list[ExecutionFinished | PoolCrashed] = []
    executor = await _executor(events)
    try:
        [stubborn] = tasks_from_wire([task("stubborn", {"pids": str(pids), "max": 120})])
        executor.submit([stubborn])
        await wait_for(lambda: _pids(pids), 10, "the stubborn task running")
        [survivor] = _pids(pids)
        [crash] = tasks_from_wire([task("crash", None)])
        executor.submit([crash])
        # Only the task that killed its child is reported, as a crash of its own.
        [event] = await wait_for(lambda: events, 10, "the crash reported")
        assert isinstance(event, PoolCrashed)
        assert [t for t, _ in event.crashed] == [crash]
        assert not event.shared and event.error_type == "BrokenProcessPool"
        assert executor.busy == 1 and not _gone(survivor)
    finally:
        await executor.close(grace=0.1)
    await wait_for(lambda: _gone(survivor), 10, f"child {survivor} killed at close")
    assert not multiprocessing.active_children()


async def test_a_child_killed_mid_batch_hands_back_only_its_own_unfinished_tasks(
    tmp_path: Path,
) -> None:
    events: list[ExecutionFinished | PoolCrashed] = []
    executor = ProcessExecutor(["worker.ops_for_tests"], 1)
    executor.attach(events.append)
    await executor.start()
    try:
        # Teach the executor that both operations are cheap, so that its child
        # holds many tasks at once (an operation never seen goes to an idle
        # child alone).
        pids = tmp_path / "pids"
        cheap = [task("echo", 0), task("stubborn", {"pids": "/dev/null", "max": 0})]
        for warm in tasks_from_wire(cheap):
            executor.submit([warm])
            await wait_for(lambda: executor.busy == 0, 10, "warm-up")
        events.clear()
        tasks = tasks_from_wire(
            [task("stubborn", {"pids": str(pids), "max": 120}, task_id=100)]
            + [task("echo", i, task_id=i) for i in range(20)]
        )
        executor.submit(tasks)
        assert executor.busy == 21 and not events, "the batch did not go to the child"
        await wait_for(lambda: _pids(pids), 10, "the stubborn task running")
        [victim] = _pids(pids)
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: len(events) == 2, 10, "the crash handled")
        crash, back = events
        # The task it was running is its crash; the ones queued behind come back unrun.
        assert isinstance(crash, PoolCrashed) and [t for t, _ in crash.crashed] == tasks[:1]
        assert isinstance(back, ExecutionFinished) and not back.results
        assert list(back.returned) == tasks[1:]
        assert executor.busy == 0
        # A replacement child says it is ready (its room is news), then serves.
        await wait_for(lambda: len(events) == 3, 20, "the replacement ready")
        assert isinstance(events[2], ExecutionFinished) and events[2].capacity
        executor.submit(tasks[1:3])
        await wait_for(lambda: len(events) == 4, 10, "the replacement's results")
        assert [o for _, o, _ in events[3].results] == [b"0", b"1"]  # type: ignore[union-attr]
    finally:
        await executor.close(grace=0.1)


_PARENT = textwrap.dedent("""
    import asyncio, json, multiprocessing
    from worker_service._executor import ProcessExecutor

    async def main():
        executor = ProcessExecutor(["worker.ops_for_tests"], 2)
        await executor.start()
        print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie waiting for init to reap it is gone too


def test_pool_children_exit_when_the_worker_is_killed() -> None:
    # Regression: after SIGKILL of the worker process its pool children
    # waited on their call queue forever (orphans, one set per killed worker).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE,
                          env=env) as parent:
        try:
            assert parent.stdout is not None
            children = json.loads(parent.stdout.readline())
            assert len(children) == 2 and not any(_gone(pid) for pid in children)
            parent.send_signal(signal.SIGKILL)
            parent.wait()
            deadline = time.monotonic() + 10
            while not all(_gone(pid) for pid in children):
                assert time.monotonic() < deadline, f"pool children outlived the worker: {children}"
                time.sleep(0.02)
        finally:
            if parent.poll() is None:
                parent.kill()
