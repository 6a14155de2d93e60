"""The WorkerRuntime against a fake orchestrator (inline and thread executors)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
import squire
from prometheus_client import generate_latest
from squire.api.v1 import squire_pb2 as pb

import worker_service
from squire_kernel.serde import Serializer, decode
from squire_kernel.wire import task_digest
from worker_service import (
    ExecutorKind,
    HelloRejected,
    LifecycleError,
    OpsLoadError,
    WorkerRuntime,
    WorkerState,
)

from .fakes import FakeOrchestrator, combine, config, task, until, wait_for
from .ops_for_tests import GATE

THREAD = ExecutorKind.THREAD


def ok(result: pb.TaskResult, serializer: Serializer = Serializer.JSON) -> object:
    assert result.WhichOneof("outcome") == "ok", result
    return decode(result.ok.output, serializer)


def err(result: pb.TaskResult) -> pb.ExecutionErr:
    assert result.WhichOneof("outcome") == "err", result
    return result.err


def test_public_api() -> None:
    assert sorted(worker_service.__all__) == [
        "ExecutorKind", "HelloRejected", "LifecycleError", "LogFormat", "OpsLoadError",
        "WorkerConfig", "WorkerError", "WorkerRuntime", "WorkerState", "run_worker",
    ]
    for name in worker_service.__all__:
        assert getattr(worker_service, name) is not None


async def test_hello_advertises_ops_and_capacity(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator, concurrency=3, prefetch=5)) as worker:
        assert worker.live
        session = await orchestrator.session()
        hello = session.hello
        assert hello.worker_id == "test-worker"
        assert list(hello.operations) == sorted(hello.operations)
        assert {"echo", "add", "slow", "flaky", "gated", "crash"} <= set(hello.operations)
        assert list(hello.monoids) == ["join", "sum"]
        assert (hello.capacity, hello.prefetch) == (3, 5)
        assert hello.version == squire.__version__
        await wait_for(lambda: worker.ready, what="ready")
        assert worker.state is WorkerState.RUNNING
    assert worker.state is WorkerState.CLOSED
    assert not worker.ready and not worker.live


async def test_prefetch_defaults_to_concurrency(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator, concurrency=4)):
        hello = (await orchestrator.session()).hello
        assert (hello.capacity, hello.prefetch) == (4, 4)


async def test_apply_and_combine_results(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator)):
        session = await orchestrator.session()
        mp = Serializer.MSGPACK
        session.send_tasks(
            task("echo", {"x": [1, 2]}, task_id=1, lease_id=99),
            task("add", 40, task_id=2, params={"n": 2}),
            task("add", 1, task_id=3, params={"n": 2}, serializer=mp),
            combine("sum", [], task_id=4),
            combine("sum", [7], task_id=5),
            combine("sum", [1, 2, 3], task_id=6, serializer=mp),
            combine("join", ["a", "b", "c"], task_id=7, params={"sep": "/"}),
        )
        await session.wait_results(7)
        first = session.result(1)
        assert ok(first) == {"x": [1, 2]}
        # What the orchestrator reads: the lease, the task, and the routing key
        # (which lets a restarted orchestrator adopt it); nothing is echoed.
        assert (first.routing_key, first.task_id, first.lease_id) == ("rk", 1, 99)
        assert (first.metadata, first.attempt) == (b"", 0)
        assert first.execution_seconds >= 0
        assert ok(session.result(2)) == 42
        assert ok(session.result(3), mp) == 3
        assert ok(session.result(4)) == 0
        assert ok(session.result(5)) == 7
        assert ok(session.result(6), mp) == 6
        assert ok(session.result(7)) == "a/b/c"
        # The inline executor runs a batch back to back: one ResultBatch.
        assert len(session.result_batches) == 1


async def test_errors_on_the_wire(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator)):
        session = await orchestrator.session()
        session.send_tasks(
            task("missing", 1, task_id=1),
            pb.Task(routing_key="rk", task_id=2, operation="echo", input=b"{oops"),
            task("ignored", 1, task_id=3),
            task("value_error", 5, task_id=4),
            pb.Task(routing_key="rk", task_id=5, operation="echo", input=b"1", serializer=7),
        )
        await session.wait_results(5)
        e = err(session.result(1))
        assert (e.kind, e.strategy) == (pb.ERROR_KIND_UNKNOWN_OPERATION, pb.FATAL_STRATEGY_TERMINATE)
        assert "'missing'" in e.message
        e = err(session.result(2))
        assert e.kind == pb.ERROR_KIND_BAD_PAYLOAD and e.message.startswith("input")
        e = err(session.result(3))
        assert (e.kind, e.strategy, e.error_type) == (
            pb.ERROR_KIND_OPERATION, pb.FATAL_STRATEGY_IGNORE, "FatalError",
        )
        assert e.message == "skip this element"
        e = err(session.result(4))
        assert (e.kind, e.strategy, e.error_type, e.message) == (
            pb.ERROR_KIND_OPERATION, pb.FATAL_STRATEGY_TERMINATE, "ValueError", "bad value 5",
        )
        assert not e.retries_exhausted and e.retries == 0
        assert err(session.result(5)).kind == pb.ERROR_KIND_BAD_PAYLOAD


async def test_inline_batch_mixing_operations_params_and_kinds(
    orchestrator: FakeOrchestrator,
) -> None:
    # Runs of tasks sharing operation, kind, params and serializer are
    # prepared once each; every change starts a new run.
    mp = Serializer.MSGPACK
    async with WorkerRuntime(config(orchestrator)):
        session = await orchestrator.session()
        session.send_tasks(
            task("add", 1, task_id=1, params={"n": 1}),
            task("add", 2, task_id=2, params={"n": 1}),
            task("add", 3, task_id=3, params={"n": 10}),  # the next stage's params
            task("add", 4, task_id=4, params={"n": 10}, serializer=mp),
            task("echo", 5, task_id=5),
            combine("sum", [1, 2], task_id=6),
            task("sum", 7, task_id=7),  # a monoid's name as an operation
            combine("join", ["a", "b"], task_id=8, params={"sep": "/"}),
            combine("join", ["a", "b"], task_id=9, params={"sep": "-"}),
            task("add", 10, task_id=10, params={"n": 1}),
            task("append_to", 11, task_id=11, params={"items": [0]}),
            task("append_to", 12, task_id=12, params={"items": [0]}),
        )
        await session.wait_results(12)
        assert [ok(session.result(i)) for i in (1, 2, 3)] == [2, 3, 13]
        assert ok(session.result(4), mp) == 14
        assert ok(session.result(5)) == 5
        assert ok(session.result(6)) == 3
        assert err(session.result(7)).kind == pb.ERROR_KIND_UNKNOWN_OPERATION
        assert ok(session.result(8)) == "a/b"
        assert ok(session.result(9)) == "a-b"
        assert ok(session.result(10)) == 11
        # A parameter the operation mutates is still fresh for every task.
        assert [ok(session.result(i)) for i in (11, 12)] == [[0, 11], [0, 12]]


async def test_inline_batch_with_failures_in_the_middle_of_a_run(
    orchestrator: FakeOrchestrator,
) -> None:
    async with WorkerRuntime(config(orchestrator)) as worker:
        session = await orchestrator.session()
        session.send_tasks(
            task("add", 1, task_id=1, params={"n": 1}, lease_id=11),
            task("add", "x", task_id=2, params={"n": 1}, lease_id=12),
            pb.Task(routing_key="rk", task_id=3, operation="add", input=b"{oops",
                    params=b'{"n":1}', serializer=1, lease_id=13),
            task("add", 4, task_id=4, params={"n": 1}, lease_id=14),
            task("missing", 5, task_id=5),
            task("missing", 6, task_id=6),
            task("add", 7, task_id=7, params={"n": 1}),
        )
        results = await session.wait_results(7)
        assert len(results) == 7  # each exactly once
        first = session.result(1)
        assert (ok(first), first.lease_id) == (2, 11)
        e = session.result(2)
        assert (e.lease_id, err(e).error_type) == (12, "TypeError")
        bad = session.result(3)
        assert bad.lease_id == 13
        assert err(bad).kind == pb.ERROR_KIND_BAD_PAYLOAD
        after = session.result(4)
        assert (ok(after), after.lease_id) == (5, 14)
        for i in (5, 6):
            assert err(session.result(i)).kind == pb.ERROR_KIND_UNKNOWN_OPERATION
        assert ok(session.result(7)) == 8
        assert worker.metrics is not None
        text = generate_latest(worker.metrics.registry).decode()
        assert 'squire_worker_tasks_total{operation="add",outcome="ok"} 3.0' in text
        assert 'squire_worker_tasks_total{operation="add",outcome="error"} 1.0' in text
        assert 'squire_worker_tasks_total{operation="add",outcome="bad_payload"} 1.0' in text
        assert 'squire_worker_tasks_total{operation="unknown",outcome="unknown_operation"} 2.0' \
            in text
        # Every task that ran ok or raised is in the execution histogram.
        assert 'squire_worker_execution_seconds_count{operation="add"} 4.0' in text


async def test_transient_errors_are_retried_by_the_worker(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    async with WorkerRuntime(config(orchestrator)):
        session = await orchestrator.session()
        counter = tmp_path / "flaky"
        session.send_tasks(
            task("flaky", {"counter": str(counter), "fail": 2}, task_id=1),
            task("always_transient", None, task_id=2),
        )
        await session.wait_results(2)
        assert ok(session.result(1)) == 3  # two failed runs, the third succeeded
        e = err(session.result(2))
        assert (e.kind, e.strategy, e.error_type, e.message) == (
            pb.ERROR_KIND_OPERATION, pb.FATAL_STRATEGY_TERMINATE, "TransientError", "still flaky",
        )
        assert e.retries_exhausted and e.retries == 2


async def test_retry_delay_holds_no_executor_slot(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    # One slot: the echo sent after the flaky task runs while it waits to retry.
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1)):
        session = await orchestrator.session()
        flaky = {"counter": str(tmp_path / "c"), "fail": 1, "delay": 0.3}
        session.send_tasks(task("flaky", flaky, task_id=1))
        await wait_for(lambda: (tmp_path / "c").exists(), what="first flaky run")
        session.send_tasks(task("echo", "quick", task_id=2))
        results = await session.wait_results(2)
        assert [r.task_id for r in results] == [2, 1]
        assert ok(session.result(1)) == 2
        assert session.result(1).execution_seconds < 0.3  # the wait is not execution


async def test_abort_drops_queued_tasks_and_signals_the_running_one(
    orchestrator: FakeOrchestrator,
) -> None:
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, prefetch=3)):
        session = await orchestrator.session()
        session.send_tasks(*(task("gated", i, key="doomed", task_id=i) for i in range(1, 4)))
        session.send_tasks(task("echo", "other", key="other", task_id=9))
        await wait_for(lambda: GATE.running == 1, what="first task running")
        session.send_ipc(pb.WorkerIpc(abort=pb.Abort(routing_key="doomed")))
        sent = time.monotonic()
        # The running task polls its abort signal and returns; the rest never start.
        await session.wait_results(4, timeout=1.0)
        assert time.monotonic() - sent < 1.0
        assert ok(session.result(1, "doomed")) == "aborted"
        for i in (2, 3):
            e = err(session.result(i, "doomed"))
            assert (e.kind, e.error_type) == (pb.ERROR_KIND_ABORTED, "Aborted")
        assert ok(session.result(9, "other")) == "other"
        assert GATE.started == 1
        # Tasks of the key that arrive later are dropped without running.
        session.send_tasks(task("gated", 4, key="doomed", task_id=4))
        await session.wait_results(5)
        assert err(session.result(4, "doomed")).kind == pb.ERROR_KIND_ABORTED
        assert GATE.started == 1


async def test_execution_failed_and_abort_all(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, prefetch=3)):
        session = await orchestrator.session()
        session.send_tasks(
            task("gated", "a1", key="a", task_id=1),
            task("gated", "a2", key="a", task_id=2),
            task("gated", "b1", key="b", task_id=1),
            task("gated", "c1", key="c", task_id=1),
        )
        await wait_for(lambda: GATE.running == 1, what="a1 running")
        session.send_ipc(
            pb.WorkerIpc(execution_failed=pb.ExecutionFailed(routing_key="b", message="boom"))
        )
        await session.wait_results(1)
        assert err(session.result(1, "b")).kind == pb.ERROR_KIND_ABORTED
        session.send_ipc(pb.WorkerIpc(abort_all=pb.AbortAll()))
        await session.wait_results(4)
        assert ok(session.result(1, "a")) == "aborted"
        assert err(session.result(2, "a")).kind == pb.ERROR_KIND_ABORTED
        assert err(session.result(1, "c")).kind == pb.ERROR_KIND_ABORTED
        # Every key held was remembered; a new key still runs.
        session.send_tasks(
            task("echo", 1, key="a", task_id=3),
            task("echo", 1, key="c", task_id=2),
            task("echo", 1, key="d", task_id=1),
        )
        await session.wait_results(7)
        assert err(session.result(3, "a")).kind == pb.ERROR_KIND_ABORTED
        assert err(session.result(2, "c")).kind == pb.ERROR_KIND_ABORTED
        assert ok(session.result(1, "d")) == 1


async def test_aborted_keys_are_forgotten_after_abort_memory(
    orchestrator: FakeOrchestrator,
) -> None:
    async with WorkerRuntime(config(orchestrator, abort_memory=0.2)):
        session = await orchestrator.session()
        session.send_ipc(pb.WorkerIpc(abort=pb.Abort(routing_key="k")))
        session.send_tasks(task("echo", 1, key="k", task_id=1))
        await session.wait_results(1)
        assert err(session.result(1, "k")).kind == pb.ERROR_KIND_ABORTED
        deadline = time.monotonic() + 0.25
        await wait_for(lambda: time.monotonic() > deadline, what="abort memory to pass")
        session.send_tasks(task("echo", 2, key="k", task_id=2))
        await session.wait_results(2)
        assert ok(session.result(2, "k")) == 2


async def test_inline_batch_observes_every_execution(orchestrator: FakeOrchestrator) -> None:
    # A run's fast executions are observed together, a slow one on its own:
    # the histogram still holds every task, with the reported durations.
    async with WorkerRuntime(config(orchestrator)) as worker:
        session = await orchestrator.session()
        session.send_tasks(
            *(task("slow", {"max": 0}, task_id=i) for i in (1, 2)),
            task("slow", {"max": 0.02}, task_id=3),
            *(task("slow", {"max": 0}, task_id=i) for i in (4, 5)),
        )
        results = await session.wait_results(5)
        assert all(ok(r) == "finished" for r in results)
        assert worker.metrics is not None
        histogram = worker.metrics.execution.labels("slow")
        assert sum(histogram.counts) == 5
        assert sum(histogram.counts[:4]) == 4  # all but the slow one within 5 ms
        assert histogram.sum == pytest.approx(sum(r.execution_seconds for r in results))
        text = generate_latest(worker.metrics.registry).decode()
        assert 'squire_worker_tasks_total{operation="slow",outcome="ok"} 5.0' in text


async def test_inline_batch_checks_every_task_for_an_aborted_key(
    orchestrator: FakeOrchestrator,
) -> None:
    async with WorkerRuntime(config(orchestrator)):
        session = await orchestrator.session()
        session.send_ipc(pb.WorkerIpc(abort=pb.Abort(routing_key="k")))
        session.send_tasks(*(
            task("echo", i, key="k" if i % 2 else "j", task_id=i) for i in range(1, 7)
        ))
        await session.wait_results(6)
        for i in (1, 3, 5):
            assert err(session.result(i, "k")).kind == pb.ERROR_KIND_ABORTED
        assert [ok(session.result(i, "j")) for i in (2, 4, 6)] == [2, 4, 6]


async def test_never_more_than_concurrency_running(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(
        config(orchestrator, executor=THREAD, concurrency=2, prefetch=3)
    ) as worker:
        session = await orchestrator.session()
        session.send_tasks(*(task("gated", i, task_id=i) for i in range(1, 6)))
        await wait_for(lambda: GATE.started == 2, what="two running")
        await wait_for(lambda: worker.session_stats == (2, 3), what="three buffered")
        assert GATE.max_running == 2
        GATE.release.set()
        results = await session.wait_results(5)
        assert sorted(ok(r) for r in results) == [1, 2, 3, 4, 5]  # type: ignore[type-var]
        assert GATE.max_running == 2 and GATE.started == 5


async def test_task_timeout(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1)):
        session = await orchestrator.session()
        session.send_tasks(
            task("slow", {"max": 5}, task_id=1, timeout=0.1),
            task("echo", "after", task_id=2, timeout=5),
        )
        await session.wait_results(2)
        e = err(session.result(1))
        assert (e.kind, e.error_type) == (pb.ERROR_KIND_TIMEOUT, "TimeoutError")
        assert ok(session.result(2)) == "after"


async def test_inline_task_over_its_timeout_is_reported_as_timed_out(
    orchestrator: FakeOrchestrator,
) -> None:
    # Inline tasks cannot be interrupted: one that ran past its timeout is
    # reported as timed out when it returns, in the middle of a fast batch.
    async with WorkerRuntime(config(orchestrator)) as worker:
        session = await orchestrator.session()
        session.send_tasks(
            task("echo", "before", task_id=1, timeout=5),
            task("slow", {"max": 0.15}, task_id=2, timeout=0.05),
            task("echo", "after", task_id=3),
        )
        await session.wait_results(3)
        assert ok(session.result(1)) == "before"
        e = err(session.result(2))
        assert (e.kind, e.error_type) == (pb.ERROR_KIND_TIMEOUT, "TimeoutError")
        assert ok(session.result(3)) == "after"
        assert worker.metrics is not None
        text = generate_latest(worker.metrics.registry).decode()
        assert 'squire_worker_tasks_total{operation="echo",outcome="ok"} 2.0' in text
        assert 'squire_worker_tasks_total{operation="slow",outcome="timeout"} 1.0' in text


async def test_heartbeats_report_running_and_buffered(orchestrator: FakeOrchestrator) -> None:
    orchestrator.heartbeat_interval = 0.05
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, prefetch=2)):
        session = await orchestrator.session()
        session.send_tasks(*(task("gated", i, task_id=i) for i in range(1, 4)))
        await wait_for(
            lambda: any((h.executing, h.buffered) == (1, 2) for h in session.heartbeats),
            what="a busy heartbeat",
        )
        GATE.release.set()
        await session.wait_results(3)
        await wait_for(
            lambda: (session.heartbeats[-1].executing, session.heartbeats[-1].buffered) == (0, 0),
            what="an idle heartbeat",
        )


async def test_drain_returns_unstarted_tasks_and_closes_cleanly(
    orchestrator: FakeOrchestrator,
) -> None:
    worker = WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, prefetch=3))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        session.send_tasks(*(task("gated", i, task_id=i) for i in range(1, 4)))
        await wait_for(lambda: GATE.running == 1, what="first task running")
        worker.request_drain()
        assert worker.state is WorkerState.DRAINING and not worker.ready and worker.live
        await session.wait_results(2)
        assert session.credits == [0]
        for i in (2, 3):
            e = err(session.result(i))
            assert (e.kind, e.error_type) == (pb.ERROR_KIND_RETURNED, "Returned")
        # Tasks still arriving while draining go straight back.
        session.send_tasks(task("echo", 4, task_id=4))
        await session.wait_results(3)
        assert err(session.result(4)).kind == pb.ERROR_KIND_RETURNED
        assert not run.done()
        GATE.release.set()  # the running task finishes within the grace
        await until(run)
    assert ok(session.result(1)) == 1
    assert len(session.results) == 4
    assert session.half_closed.is_set()
    assert worker.state is WorkerState.CLOSED
    await worker.shutdown()  # idempotent


async def test_drain_deadline_returns_running_tasks(orchestrator: FakeOrchestrator) -> None:
    worker = WorkerRuntime(
        config(orchestrator, executor=THREAD, concurrency=1, prefetch=0, drain_grace=0.2)
    )
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        session.send_tasks(task("gated", 1, task_id=1))
        await wait_for(lambda: GATE.running == 1, what="task running")
        started = time.monotonic()
        await until(worker.shutdown())
        assert run.done()
    assert time.monotonic() - started < 2.0
    assert err(session.result(1)).kind == pb.ERROR_KIND_RETURNED
    assert len(session.results) == 1
    assert session.half_closed.is_set()
    await wait_for(lambda: GATE.running == 0, what="the operation to see its abort signal")


async def test_drain_ipc(orchestrator: FakeOrchestrator) -> None:
    worker = WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, prefetch=1))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        session.send_tasks(task("gated", 1, task_id=1), task("gated", 2, task_id=2))
        await wait_for(lambda: GATE.running == 1, what="first task running")
        session.send_ipc(pb.WorkerIpc(drain=pb.Drain(grace_seconds=0.1)))
        await until(run)
    assert [err(session.result(i)).kind for i in (1, 2)] == [pb.ERROR_KIND_RETURNED] * 2
    assert session.credits == [0] and session.half_closed.is_set()


async def test_second_drain_request_cuts_the_grace_short(orchestrator: FakeOrchestrator) -> None:
    worker = WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=1, drain_grace=30))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        session.send_tasks(task("gated", 1, task_id=1))
        await wait_for(lambda: GATE.running == 1, what="task running")
        worker.request_drain()
        worker.request_drain()  # idempotent: still waiting for the task
        await wait_for(lambda: session.credits == [0], what="credit 0")
        assert not run.done() and not session.results
        worker.expire_drain()
        await until(run)
    assert err(session.result(1)).kind == pb.ERROR_KIND_RETURNED


async def test_reconnects_after_the_orchestrator_restarts(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator, executor=THREAD, concurrency=2)) as worker:
        first = await orchestrator.session()
        first.send_tasks(task("gated", "old", task_id=1, lease_id=41), task("echo", "hi", task_id=2))
        await first.wait_results(1)
        await wait_for(lambda: GATE.running == 1, what="old task running")
        await orchestrator.stop(0)
        await wait_for(lambda: worker.state is WorkerState.CONNECTING, what="connecting")
        assert not worker.ready and worker.live
        await orchestrator.start()  # same port
        second = await orchestrator.session(2)
        await wait_for(lambda: worker.ready, what="ready again")
        # The old task ran on; the new hello names it, so the orchestrator
        # can lease it back instead of running it again.
        assert GATE.running == 1
        # Task 2's result was written just before the break: it may never
        # have arrived, so it is named (and sent) again.
        held = {h.task_id: h for h in second.hello.held}
        assert set(held) == {1, 2}
        held = held[1]
        assert (held.routing_key, held.task_id, held.lease_id) == ("rk", 1, 41)
        expected = task_digest(0, "gated", b"", task("gated", "old").input, ())
        assert held.digest == expected
        second.send_tasks(task("echo", "new", task_id=3))
        await wait_for(lambda: any(r.task_id == 3 for r in second.results), what="task 3")
        GATE.release.set()
        # 2 (sent again), 3, and 1 once the gate opens, in any order
        await second.wait_results(3)
        assert sorted(r.task_id for r in second.results) == [1, 2, 3]
        assert ok(second.result(1)) == "old" and ok(second.result(3)) == "new"
        assert second.result(1).lease_id == 41


async def test_results_of_a_broken_stream_are_sent_on_the_next(
    orchestrator: FakeOrchestrator,
) -> None:
    """A task that finishes while no stream is up is reported on the next one."""
    async with WorkerRuntime(
        config(orchestrator, executor=THREAD, concurrency=1, reconnect_min=0.3, reconnect_max=0.3)
    ) as worker:
        first = await orchestrator.session()
        first.send_tasks(task("gated", "v", task_id=7, lease_id=70))
        await wait_for(lambda: GATE.running == 1, what="task running")
        await orchestrator.stop(0)
        await wait_for(lambda: worker.state is WorkerState.CONNECTING, what="connecting")
        GATE.release.set()  # it finishes between the streams
        await wait_for(lambda: GATE.running == 0, what="task done")
        await orchestrator.start()
        second = await orchestrator.session(2)
        assert [h.task_id for h in second.hello.held] == [7]
        await second.wait_results(1)
        assert ok(second.result(7)) == "v" and second.result(7).lease_id == 70
        assert first.results == []


async def test_waits_for_an_unreachable_orchestrator(orchestrator: FakeOrchestrator) -> None:
    await orchestrator.stop(0)
    async with WorkerRuntime(config(orchestrator)) as worker:
        await asyncio.sleep(0)
        await wait_for(lambda: worker.state is WorkerState.CONNECTING, what="connecting")
        await orchestrator.start()
        session = await orchestrator.session()
        session.send_tasks(task("echo", 1))
        await session.wait_results(1)


async def test_drain_while_disconnected_closes_at_once(orchestrator: FakeOrchestrator) -> None:
    await orchestrator.stop(0)
    worker = WorkerRuntime(config(orchestrator, reconnect_min=5, reconnect_max=5))
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        await wait_for(lambda: worker.state is WorkerState.CONNECTING, what="connecting")
        await until(worker.shutdown(), timeout=2)
        assert run.done()
    assert worker.state is WorkerState.CLOSED


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS]
)
async def test_rejected_hello_stops_the_worker(
    orchestrator: FakeOrchestrator, code: grpc.StatusCode
) -> None:
    orchestrator.reject = code
    worker = WorkerRuntime(config(orchestrator))
    with pytest.raises(HelloRejected) as info:
        await until(worker.run())
    assert info.value.code == code.name
    assert "rejected by the test" in str(info.value)
    assert worker.state is WorkerState.CLOSED


async def test_lifecycle_misuse(orchestrator: FakeOrchestrator) -> None:
    worker = WorkerRuntime(config(orchestrator))
    await worker.shutdown()  # before run: just closes
    assert worker.state is WorkerState.CLOSED
    with pytest.raises(LifecycleError):
        await worker.run()



async def test_already_exists_is_retried_after_a_session(orchestrator: FakeOrchestrator) -> None:
    # The orchestrator may still hold the old stream when the worker comes back.
    async with WorkerRuntime(config(orchestrator)) as worker:
        first = await orchestrator.session()
        orchestrator.reject, orchestrator.reject_times = grpc.StatusCode.ALREADY_EXISTS, 2
        first.end_stream()
        accepted = await orchestrator.session(4)  # after two rejected hellos
        await wait_for(lambda: worker.ready, what="ready again")
        accepted.send_tasks(task("echo", 1))
        await accepted.wait_results(1)


@pytest.mark.parametrize(
    ("ops", "message"),
    [
        (("no_such_module_here",), "cannot load ops module 'no_such_module_here'"),
        (("json",), "offer no operation or monoid"),
    ],
)
def test_ops_that_cannot_serve(ops: tuple[str, ...], message: str) -> None:
    with pytest.raises(OpsLoadError, match=message):
        WorkerRuntime(config(FakeOrchestrator(), ops=ops))


async def test_process_children_that_cannot_import_the_ops(
    orchestrator: FakeOrchestrator,
) -> None:
    worker = WorkerRuntime(config(
        orchestrator, ops=("worker.ops_parent_only",), executor=ExecutorKind.PROCESS,
        concurrency=1,
    ))
    with pytest.raises(OpsLoadError, match="children cannot import"):
        await until(worker.run(), timeout=30)
    assert worker.state is WorkerState.CLOSED
    assert not orchestrator.sessions


async def test_context_manager_exits_at_once(orchestrator: FakeOrchestrator) -> None:
    async with WorkerRuntime(config(orchestrator)) as worker:
        pass
    assert worker.state is WorkerState.CLOSED
    with pytest.raises(LifecycleError):
        await worker.run()


async def test_every_task_is_reported_exactly_once_under_churn(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    """A flow-controlled stream of mixed tasks, aborts and a final drain."""
    cfg = config(orchestrator, executor=THREAD, concurrency=2, prefetch=3)
    worker = WorkerRuntime(cfg)
    sent: list[tuple[str, int]] = []
    async with asyncio.TaskGroup() as tg:
        run = tg.create_task(worker.run())
        session = await orchestrator.session()
        kinds = ["echo", "flaky", "value_error", "slow", "always_transient"]
        for n in range(120):
            # Never more unreported tasks than the window, like the orchestrator.
            await wait_for(lambda: len(sent) - len(session.results) < cfg.window, what="credit")
            key, op = f"k{n % 7}", kinds[n % len(kinds)]
            value: object = n
            if op == "flaky":
                value = {"counter": str(tmp_path / f"c{n}"), "fail": 1, "delay": 0.01}
            elif op == "slow":
                value = {"max": 0.05}
            session.send_tasks(task(op, value, key=key, task_id=n))
            sent.append((key, n))
            if n % 25 == 24:
                session.send_ipc(pb.WorkerIpc(abort=pb.Abort(routing_key=f"k{n % 7}")))
        worker.request_drain()
        await until(run)
    reported = [(r.routing_key, r.task_id) for r in session.results]
    assert len(reported) == len(set(reported)), "a task was reported twice"
    assert set(reported) <= set(sent)
    # Tasks still in transit when the drained worker closes its stream are
    # never seen by it; the orchestrator re-queues every unreported lease when
    # the stream ends. Only the last window of tasks can be in transit.
    missing = set(sent) - set(reported)
    assert all(n >= len(sent) - cfg.window for _, n in missing), missing
    kinds_seen = {r.err.kind for r in session.results if r.HasField("err")}
    assert pb.ERROR_KIND_ABORTED in kinds_seen
