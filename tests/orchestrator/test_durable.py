"""Durable directives over the network, without processes (issue 15): a real
grpc.aio orchestrator on a real SQLite journal in a temporary directory,
in-test workers on the wire. Attach by id, detached directives, list and
cancel, and a restart of the orchestrator on the same journal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._durable import Retention
from orchestrator_service._journal import StoreInUse
from orchestrator_service._model import RouterConfig
from orchestrator_service._server import Orchestrator, OrchestratorConfig
from squire_kernel.serde import decode, encode

from .conftest import WireWorker, wait_for


def config(store: str, port: int = 0) -> OrchestratorConfig:
    return OrchestratorConfig(
        port=port, grace=2.0, tick_interval=0.05, store=store,
        # The wire workers here send no heartbeat: no adoption grace to sit out.
        router=RouterConfig(no_worker_timeout=30.0, lease_timeout=2.0, adoption_grace=0.0),
    )


@pytest.fixture
def journal(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'journal.db'}"


@contextlib.asynccontextmanager
async def running_workers(orch: Orchestrator, n: int = 2) -> AsyncIterator[list[WireWorker]]:
    target = f"127.0.0.1:{orch.port}"
    ws = [WireWorker(target, f"w{i}") for i in range(n)]
    tasks = [asyncio.create_task(w.run()) for w in ws]
    await wait_for(lambda: len(orch.router.workers) == n)
    try:
        yield ws
    finally:
        for w in ws:
            w.stop()
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await t


def plan_request(operation: str = "fib_at", *, detached: bool = False) -> pb.DirectiveRequest:
    plan = pb.Plan(serializer=pb.SERIALIZER_JSON, detached=detached)
    plan.stages.add().map.operation = operation
    return pb.DirectiveRequest(plan=plan)


def inputs(values: list[int]) -> pb.DirectiveRequest:
    return pb.DirectiveRequest(inputs=pb.InputBatch(items=[encode(v) for v in values]))


def attach(directive_id: str, values: int = 0, skipped: int = 0) -> pb.DirectiveRequest:
    return pb.DirectiveRequest(attach=pb.AttachDirective(
        directive_id=directive_id, values_received=values, skipped_received=skipped))


async def submit_detached(stub: pb_grpc.DirectiveServiceStub, xs: list[int]) -> str:
    """Submit a detached map of fib_at over ``xs`` and leave once its inputs
    are journaled (progress counts only journaled inputs as received)."""
    call = stub.RunDirective(iter([plan_request(detached=True), inputs(xs)]))
    directive_id = ""
    async for event in call:
        kind = event.WhichOneof("kind")
        if kind == "started":
            directive_id = event.started.directive_id
        elif kind == "progress" and event.progress.received == len(xs):
            call.cancel()
            return directive_id
    raise AssertionError("the call ended before its inputs were journaled")


async def read_all(call: grpc.aio.StreamStreamCall) -> tuple[pb.DirectiveStarted, dict[int, int]]:
    started = None
    values: dict[int, int] = {}
    async for event in call:
        kind = event.WhichOneof("kind")
        if kind == "started":
            started = event.started
        elif kind == "items":
            for item in event.items.items:
                assert item.index not in values, f"index {item.index} twice"
                values[item.index] = decode(item.value)
    assert started is not None
    return started, values


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def test_a_detached_directive_runs_on_and_is_read_later(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            directive_id = await submit_detached(stub, list(range(30)))
            async with running_workers(orch):
                await wait_for(lambda: directive_id in orch.hub.ended)
                listed = await stub.ListDirectives(pb.ListDirectivesRequest())
                info = {d.directive_id: d for d in listed.directives}[directive_id]
                assert info.state == "done" and info.detached and info.received == 30
                started, values = await read_all(stub.RunDirective(iter([attach(directive_id)])))
            assert started.attached and started.input_closed and started.received == 30
            assert started.directive_id == directive_id
            assert values == {i: fib(i) for i in range(30)}


async def test_what_a_detached_submitter_gets_does_not_count_as_read(journal: str) -> None:
    """A fast detached directive may end before its submitter leaves: its
    results stay for --retention, not only for the reattach grace."""
    cfg = dataclasses.replace(config(journal), retention=Retention(reattach_grace=0.0))
    async with Orchestrator(cfg) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            async with running_workers(orch):
                submitter = stub.RunDirective(iter([plan_request(detached=True), inputs([5, 6])]))
                started, values = await read_all(submitter)  # it stays to the end
            assert values == {0: 5, 1: 8}
            directive_id = started.directive_id
            assert directive_id not in orch.hub.read_at  # not read: not swept after the grace
            orch.durable.sweep()
            _, again = await read_all(stub.RunDirective(iter([attach(directive_id)])))
            assert again == values


async def test_an_attaching_caller_gets_only_what_it_lacks(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            directive_id = await submit_detached(stub, list(range(40)))
            async with running_workers(orch):
                await wait_for(lambda: directive_id in orch.hub.ended)
                _, first = await read_all(stub.RunDirective(iter([attach(directive_id)])))
                # the emission order is the journal's: the same on every read
                order = list(first)
                _, rest = await read_all(stub.RunDirective(iter([attach(directive_id, 25)])))
            assert list(rest) == order[25:]


async def test_the_latest_attach_wins_and_the_directive_runs_on(journal: str) -> None:
    """A caller whose connection broke unnoticed (or a detached submit still
    closing) holds its directive: the next attach takes it over; the earlier
    call ends ABORTED and nothing is cancelled or lost."""
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            call = stub.RunDirective(iter([plan_request(), inputs(list(range(20)))]))
            directive_id = ""
            async for event in call:
                if event.WhichOneof("kind") == "started":
                    directive_id = event.started.directive_id
                    break
            assert orch.hub.calls.get(directive_id) is not None  # the first caller holds it
            second = stub.RunDirective(iter([attach(directive_id)]))
            async with running_workers(orch):
                started, values = await read_all(second)
            assert started.attached and values == {i: fib(i) for i in range(20)}
            with pytest.raises(grpc.aio.AioRpcError) as displaced:
                async for _ in call:
                    pass
            assert displaced.value.code() is grpc.StatusCode.ABORTED
            assert "another caller attached" in (displaced.value.details() or "")


async def test_a_restarted_orchestrator_goes_on_from_its_journal(journal: str) -> None:
    orch = Orchestrator(config(journal))
    port = await orch.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DirectiveServiceStub(channel)
        # No worker yet: the tasks wait in the queue when the orchestrator stops.
        directive_id = await submit_detached(stub, list(range(50)))
    await orch.shutdown()

    again = Orchestrator(config(journal, port))
    await again.start()
    try:
        assert again.resumed == 1 and again.epoch == orch.epoch + 1
        assert directive_id in again.router.directives
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            async with running_workers(again) as ws:
                _, values = await read_all(stub.RunDirective(iter([attach(directive_id)])))
            assert values == {i: fib(i) for i in range(50)}
            assert sum(len(w.executed) for w in ws) == 50
            # lease ids of this epoch never match an earlier one's
            assert all(t.lease_id >> 40 == again.epoch for w in ws for t in w.executed)
    finally:
        await again.shutdown()


async def test_cancel_by_id_and_unknown_ids(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            directive_id = await submit_detached(stub, [1, 2, 3])
            await stub.CancelDirective(pb.CancelDirectiveRequest(directive_id=directive_id))
            await wait_for(lambda: directive_id not in orch.router.directives)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CancelDirective(pb.CancelDirectiveRequest(directive_id="nope"))
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.RunDirective(iter([attach("nope")])))
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            assert "no directive 'nope'" in (err.value.details() or "")


async def test_a_caller_that_leaves_cancels_its_directive_unless_detached(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            call = stub.RunDirective(iter([plan_request(), inputs([1, 2])]))
            async for event in call:
                assert event.WhichOneof("kind") == "started"
                directive_id = event.started.directive_id
                break
            call.cancel()
            await wait_for(lambda: directive_id not in orch.router.directives)
            await wait_for(lambda: directive_id not in orch.hub.released)  # out of the journal


async def test_attach_needs_a_journal() -> None:
    async with Orchestrator(config("memory:")) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.RunDirective(iter([attach("x")])))
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "--store memory:" in (err.value.details() or "")


async def test_two_orchestrators_never_share_one_journal(journal: str) -> None:
    async with Orchestrator(config(journal)):
        second = Orchestrator(config(journal))
        with pytest.raises(StoreInUse, match="in use by another orchestrator"):
            await second.start()


async def test_a_detached_directive_needs_a_journal() -> None:
    async with Orchestrator(config("memory:")) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read_all(stub.RunDirective(iter([plan_request(detached=True)])))
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "detached directive needs a journal" in (err.value.details() or "")


async def test_the_journal_has_metrics(journal: str) -> None:
    from prometheus_client import generate_latest

    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            directive_id = await submit_detached(stub, list(range(10)))
            assert directive_id
        assert orch.metrics is not None
        text = (await asyncio.to_thread(generate_latest, orch.metrics.registry)).decode()
    for name in ("squire_journal_commits_total", "squire_journal_bytes",
                 "squire_journal_commit_seconds_bucket", "squire_journal_commit_entries_count",
                 "squire_recovery_seconds", "squire_directives_resumed", "squire_journal_failing"):
        assert name in text, name
    commits = next(line for line in text.splitlines()
                   if line.startswith("squire_journal_commits_total"))
    assert float(commits.split()[-1]) >= 2
