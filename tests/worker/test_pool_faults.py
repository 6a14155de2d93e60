"""Process-pool faults: a child that kills itself, a worker killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
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


async def test_survivors_of_a_broken_pool_are_killed_and_drain_kills_the_rest(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    # Regression: a broken pool's other children ran on unseen (their futures
    # had failed), and its clean-up waited for them after SIGTERM, which
    # children ignore: the worker (and a test run) hung at interpreter exit.
    # The drain deadline's SIGKILL also missed them: the pool forgets its
    # process table on shutdown().
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
        # The pool breaks; the stubborn task runs again alone in a new pool ...
        await wait_for(lambda: len(_pids(pids)) == 2, 10, "the stubborn task running again")
        rerun = _pids(pids)[1]
        # ... and its first run's child is gone, though it had 120 s to go.
        await wait_for(lambda: _gone(survivor), 10, f"the broken pool's child {survivor} killed")
        assert not _gone(rerun)
    # The drain deadline kills the child still running past it.
    await wait_for(lambda: _gone(rerun), 10, f"child {rerun} killed at the drain deadline")
    assert session.result(1, "a").err.kind == pb.ERROR_KIND_RETURNED  # handed back, not lost


async def test_closing_an_executor_whose_pool_broke_kills_its_survivors(tmp_path: Path) -> None:
    # The worker may close right as its pool breaks, before any session has
    # replaced it: every slot is free then, yet a child still runs.
    pids = tmp_path / "pids"
    executor = ProcessExecutor(["worker.ops_for_tests"], 2)
    events: list[ExecutionFinished | PoolCrashed] = []
    executor.attach(events.append)
    await executor.start()
    try:
        [stubborn] = tasks_from_wire([task("stubborn", {"pids": str(pids), "max": 120})])
        executor.submit([stubborn])
        await wait_for(lambda: _pids(pids), 10, "the stubborn task running")
        [survivor] = _pids(pids)
        [crash] = tasks_from_wire([task("crash", None)])
        executor.submit([crash])
        # Both runs of the broken pool are reported together, as one crash.
        [event] = await wait_for(lambda: events, 10, "the crash reported")
        assert isinstance(event, PoolCrashed)
        assert {t for t, _ in event.crashed} == {stubborn, crash}
        assert event.shared and event.error_type == BrokenProcessPool.__name__
        assert executor.busy == 0
    finally:
        await executor.close(grace=0.1)
    await wait_for(lambda: _gone(survivor), 10, f"the broken pool's child {survivor} killed")


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
