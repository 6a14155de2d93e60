"""The worker's HTTP endpoint: /metrics, /healthz, /readyz."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

from squire_kernel.serde import decode
from worker_service import ExecutorKind, WorkerRuntime

from .fakes import FakeOrchestrator, config, task, until, wait_for
from .ops_for_tests import GATE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def fetch(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path)


async def test_probes_and_metrics(orchestrator: FakeOrchestrator) -> None:
    port = free_port()
    worker = WorkerRuntime(config(orchestrator, metrics_port=port, metrics_host="127.0.0.1"))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        await wait_for(lambda: worker.ready, what="ready")
        assert (await fetch(port, "/readyz"))[0] == 200
        assert (await fetch(port, "/healthz"))[0] == 200
        session.send_tasks(task("echo", 5, task_id=1), task("value_error", 1, task_id=2))
        await session.wait_results(2)
        code, text = await fetch(port, "/metrics")
        assert code == 200
        assert 'squire_worker_tasks_total{operation="echo",outcome="ok"} 1.0' in text
        assert 'squire_worker_tasks_total{operation="value_error",outcome="error"} 1.0' in text
        assert "squire_worker_capacity 2.0" in text
        assert "squire_worker_ready 1.0" in text
        assert (await fetch(port, "/nope"))[0] == 404
        worker.request_drain()
        await until(run)
    # closed: the endpoint is gone with the worker
    assert not worker.live


async def test_readyz_flips_when_the_orchestrator_goes_away_and_on_drain(
    orchestrator: FakeOrchestrator,
) -> None:
    port = free_port()
    cfg = config(
        orchestrator, metrics_port=port, metrics_host="127.0.0.1", drain_grace=5,
        executor=ExecutorKind.THREAD,
    )
    worker = WorkerRuntime(cfg)
    GATE.reset()
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        await orchestrator.session()
        await wait_for(lambda: worker.ready, what="ready")
        assert (await fetch(port, "/readyz"))[0] == 200
        await orchestrator.stop(0)  # the orchestrator goes away
        await wait_for(lambda: not worker.ready, what="not ready")
        assert (await fetch(port, "/readyz"))[0] == 503
        assert (await fetch(port, "/healthz"))[0] == 200  # alive: reconnecting
        await orchestrator.start()  # back on the same port
        session = await orchestrator.session(2)
        await wait_for(lambda: worker.ready, what="ready again")
        assert (await fetch(port, "/readyz"))[0] == 200
        # A running task holds the drain open, so the endpoint is still up.
        session.send_tasks(task("gated", 1, task_id=1))
        await wait_for(lambda: GATE.running == 1, what="the gated task running")
        worker.request_drain()
        assert not worker.ready  # the probe reads this attribute
        assert (await fetch(port, "/readyz"))[0] == 503
        assert (await fetch(port, "/healthz"))[0] == 200  # draining is alive
        GATE.release.set()
        await until(run)
    await session.wait_results(1)
    assert decode(session.result(1).ok.output) == 1  # it finished within the grace
