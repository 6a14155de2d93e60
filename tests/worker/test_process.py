"""The process executor: spawned children, shared-memory abort flags, crashes."""

from __future__ import annotations

import time
from pathlib import Path

from squire.api.v1 import squire_pb2 as pb

from squire_kernel.serde import decode
from worker_service import ExecutorKind, WorkerRuntime

from .fakes import FakeOrchestrator, combine, config, task, wait_for

PROCESS = ExecutorKind.PROCESS


async def test_process_executor_runs_tasks_retries_and_aborts(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    cfg = config(orchestrator, executor=PROCESS, concurrency=2, prefetch=2)
    async with WorkerRuntime(cfg):
        session = await orchestrator.session()
        marker = tmp_path / "started"
        session.send_tasks(
            task("slow", {"marker": str(marker), "max": 20}, key="slow", task_id=1),
            task("add", 1, task_id=1, params={"n": 2}),
            combine("sum", [1, 2, 3], task_id=2),
            task("flaky", {"counter": str(tmp_path / "c"), "fail": 2}, task_id=3),
        )
        await session.wait_results(3)
        assert decode(session.result(1).ok.output) == 3
        assert decode(session.result(2).ok.output) == 6
        assert decode(session.result(3).ok.output) == 3  # two failures in the child, then ok

        await wait_for(marker.exists, what="slow task running in a child")
        session.send_ipc(pb.WorkerIpc(abort=pb.Abort(routing_key="slow")))
        sent = time.monotonic()
        await session.wait_results(4, timeout=1.0)
        assert time.monotonic() - sent < 1.0
        assert decode(session.result(1, "slow").ok.output) == "aborted"


async def test_crashing_child_is_reported_and_the_worker_lives_on(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    cfg = config(orchestrator, executor=PROCESS, concurrency=2, prefetch=0)
    async with WorkerRuntime(cfg) as worker:
        session = await orchestrator.session()
        marker = tmp_path / "started"
        session.send_tasks(task("slow", {"marker": str(marker), "max": 2}, task_id=1))
        await wait_for(marker.exists, what="slow task running in a child")
        session.send_tasks(task("crash", None, task_id=2))
        await session.wait_results(2, timeout=15)
        # Both ran in the pool that broke; each ran again alone, so only the
        # task that kills its child is reported crashed.
        assert decode(session.result(1).ok.output) == "finished"
        e = session.result(2).err
        assert (e.kind, e.strategy) == (pb.ERROR_KIND_CRASHED, pb.FATAL_STRATEGY_TERMINATE)
        assert e.error_type == "BrokenProcessPool"
        assert worker.ready
        session.send_tasks(task("echo", "alive", task_id=3), task("echo", "still", task_id=4))
        await session.wait_results(4)
        assert decode(session.result(3).ok.output) == "alive"
        assert decode(session.result(4).ok.output) == "still"
