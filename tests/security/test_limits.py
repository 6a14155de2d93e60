"""Limits: the request past each limit gets RESOURCE_EXHAUSTED naming the
limit, and the orchestrator goes on serving the next valid request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._core import Router
from orchestrator_service._interceptor import SecurityInterceptor, acquire_directive_slot
from orchestrator_service._model import RouterConfig, RouterError
from orchestrator_service._security import Limits, SecurityConfig
from orchestrator_service._server import Orchestrator
from squire_kernel.serde import encode
from worker_service._runtime import WorkerRuntime

from .conftest import (
    CLIENT_TOKEN,
    CLIENT_TOKEN_2,
    CLIENT_TOKEN_3,
    bearer,
    orchestrator,
    target,
    wait_for,
    worker_config,
    worker_stream,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PLAN = pb.Plan(stages=[pb.Stage(map=pb.MapStage(operation="fib_at"))])
THREE_CLIENTS = SecurityConfig(client_tokens=(CLIENT_TOKEN, CLIENT_TOKEN_2, CLIENT_TOKEN_3))


async def status_ok(orch: Orchestrator, token: str | None = None) -> None:
    """The orchestrator still serves a valid request."""
    async with grpc.aio.insecure_channel(target(orch)) as channel:
        response = await pb_grpc.StatusServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), metadata=bearer(token), timeout=5)
    assert response.state == "running"


class HeldDirective:
    """A RunDirective whose input stays open until finish(). It runs on the
    blocking gRPC stack in threads, which reports the server's status even
    when the server ends the call while the client still streams (see
    squire._bridge)."""

    def __init__(self, orch: Orchestrator, token: str | None) -> None:
        self._release = threading.Event()
        self._channel = grpc.insecure_channel(target(orch))

        def requests() -> Iterator[pb.DirectiveRequest]:
            yield pb.DirectiveRequest(plan=PLAN)
            self._release.wait(60)

        self._call = pb_grpc.DirectiveServiceStub(self._channel).RunDirective(
            requests(), metadata=bearer(token), timeout=60)

    async def first(self) -> pb.DirectiveEvent | grpc.RpcError:
        def read() -> pb.DirectiveEvent | grpc.RpcError:
            try:
                return next(self._call)
            except grpc.RpcError as exc:
                return exc
        return await asyncio.to_thread(read)

    async def finish(self) -> grpc.StatusCode:
        self._release.set()

        def drain() -> grpc.StatusCode:
            try:
                for _ in self._call:
                    pass
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        try:
            return await asyncio.to_thread(drain)
        finally:
            self._channel.close()


async def start(orch: Orchestrator, token: str | None = None) -> HeldDirective:
    held = HeldDirective(orch, token)
    event = await held.first()
    assert isinstance(event, pb.DirectiveEvent) and event.HasField("started"), event
    return held


async def refused(orch: Orchestrator, token: str | None, limit: str) -> None:
    held = HeldDirective(orch, token)
    error = await held.first()
    await held.finish()
    assert isinstance(error, grpc.RpcError), error
    assert error.code() is EXHAUSTED, error
    assert f"{limit} limit reached" in error.details()


async def test_directive_limits_per_client_and_overall() -> None:
    limits = Limits(max_directives=2, max_directives_per_client=1)
    async with orchestrator(security=THREE_CLIENTS, limits=limits) as orch:
        first = await start(orch, CLIENT_TOKEN)
        await refused(orch, CLIENT_TOKEN, "max_directives_per_client")
        second = await start(orch, CLIENT_TOKEN_2)
        await refused(orch, CLIENT_TOKEN_3, "max_directives")
        await status_ok(orch, CLIENT_TOKEN_3)
        assert await first.finish() is grpc.StatusCode.OK
        third = await start(orch, CLIENT_TOKEN_3)  # a slot is free again
        await refused(orch, CLIENT_TOKEN, "max_directives")
        assert await second.finish() is grpc.StatusCode.OK
        again = await start(orch, CLIENT_TOKEN)
        for held in (third, again):
            assert await held.finish() is grpc.StatusCode.OK


async def test_without_tokens_a_client_is_its_peer_address() -> None:
    async with orchestrator(limits=Limits(max_directives_per_client=1)) as orch:
        first = await start(orch)
        await refused(orch, None, "max_directives_per_client")
        assert await first.finish() is grpc.StatusCode.OK
        assert await (await start(orch)).finish() is grpc.StatusCode.OK


async def test_channel_limits_per_client_and_overall() -> None:
    limits = Limits(max_channels=2, max_channels_per_client=1)
    async with orchestrator(security=THREE_CLIENTS, limits=limits) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            stub = pb_grpc.ChannelServiceStub(channel)

            async def lease(token: str) -> str:
                response = await stub.LeaseChannel(
                    pb.LeaseChannelRequest(), metadata=bearer(token), timeout=5)
                return str(response.channel_id)

            async def lease_refused(token: str, limit: str) -> None:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await lease(token)
                assert info.value.code() is EXHAUSTED
                assert f"{limit} limit reached" in (info.value.details() or "")

            mine = await lease(CLIENT_TOKEN)
            await lease_refused(CLIENT_TOKEN, "max_channels_per_client")
            await lease(CLIENT_TOKEN_2)
            await lease_refused(CLIENT_TOKEN_3, "max_channels")
            await status_ok(orch, CLIENT_TOKEN)
            await stub.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=mine),
                                      metadata=bearer(CLIENT_TOKEN), timeout=5)
            await lease(CLIENT_TOKEN_3)  # the released channel freed a slot
            await lease_refused(CLIENT_TOKEN, "max_channels")


def _publish(orch: Orchestrator, channel_id: str, task_ids: range, payload: bytes = b"",
             ) -> tuple[grpc.StatusCode, str]:
    """Publish on the blocking stack (called in a thread)."""
    tasks = [pb.TaskSpec(task_id=i, operation="fib_at", input=payload or encode(i))
             for i in task_ids]
    with grpc.insecure_channel(target(orch)) as channel:
        try:
            pb_grpc.ChannelServiceStub(channel).Publish(
                iter([pb.PublishRequest(channel_id=channel_id, tasks=tasks)]), timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_pending_tasks_per_channel_count_unread_results() -> None:
    router = RouterConfig(max_pending_per_channel=5, max_queued_per_channel=100,
                          no_worker_timeout=60.0)
    async with orchestrator(router=router) as orch:
        async with WorkerRuntime(worker_config(orch)) as worker:
            await wait_for(lambda: worker.ready, message="the worker")
            async with grpc.aio.insecure_channel(target(orch)) as channel:
                stub = pb_grpc.ChannelServiceStub(channel)
                cid = (await stub.LeaseChannel(pb.LeaseChannelRequest(), timeout=5)).channel_id
                assert await asyncio.to_thread(_publish, orch, cid, range(5)) == (
                    grpc.StatusCode.OK, "")
                await wait_for(lambda: orch.router.channels[cid].completed == 5,
                               message="five results, unread")
                code, details = await asyncio.to_thread(_publish, orch, cid, range(5, 6))
                assert code is EXHAUSTED
                assert "max_pending_per_channel limit reached" in details
                await status_ok(orch)
                # Taking the results makes room again.
                subscription = stub.Subscribe(pb.SubscribeRequest(channel_id=cid))
                taken = 0
                async for batch in subscription:
                    taken += len(batch.results)
                    if taken == 5:
                        break
                subscription.cancel()
                assert await asyncio.to_thread(_publish, orch, cid, range(5, 6)) == (
                    grpc.StatusCode.OK, "")


async def test_max_message_bytes() -> None:
    async with orchestrator(max_message_bytes=64 * 1024) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            cid = (await pb_grpc.ChannelServiceStub(channel).LeaseChannel(
                pb.LeaseChannelRequest(), timeout=5)).channel_id
        code, details = await asyncio.to_thread(
            _publish, orch, cid, range(1), encode("x" * 100_000))
        assert code is EXHAUSTED
        assert "larger than max" in details  # gRPC's own message: "(<size> vs. 65536)"
        await status_ok(orch)
        assert await asyncio.to_thread(_publish, orch, cid, range(1)) == (grpc.StatusCode.OK, "")


async def test_max_workers() -> None:
    async with orchestrator(router=RouterConfig(max_workers=1)) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            async with worker_stream(channel, "w1") as first:
                assert (await first.read()).HasField("welcome")
                async with worker_stream(channel, "w2") as second:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await second.read()
                assert info.value.code() is EXHAUSTED
                assert "max_workers limit reached" in (info.value.details() or "")
                await status_ok(orch)
            await wait_for(lambda: not orch.router.workers, message="w1 to disconnect")
            async with worker_stream(channel, "w2") as second:
                assert (await second.read()).HasField("welcome")


class SessionLikeDirectives(pb_grpc.DirectiveServiceServicer):
    """Stands in for a servicer that runs several directives in one call:
    it takes a slot per directive with acquire_directive_slot()."""

    async def RunDirective(self, request_iterator, context):  # type: ignore[no-untyped-def,override]
        extra = acquire_directive_slot()  # the interceptor holds one for this call
        try:
            acquire_directive_slot()
        except RouterError as exc:
            await context.write(pb.DirectiveEvent(
                started=pb.DirectiveStarted(directive_id=f"{exc.code.value}: {exc.message}")))
        finally:
            extra.release()
            extra.release()  # idempotent


async def test_servicers_take_directive_slots_through_the_gate() -> None:
    assert acquire_directive_slot() is not None  # outside a handler: limits nothing
    interceptor = SecurityInterceptor(SecurityConfig(), Limits(max_directives_per_client=2),
                                      Router(RouterConfig(), time.monotonic))
    server = grpc.aio.server(interceptors=[interceptor])
    pb_grpc.add_DirectiveServiceServicer_to_server(SessionLikeDirectives(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            async def requests() -> AsyncIterator[pb.DirectiveRequest]:
                yield pb.DirectiveRequest(plan=PLAN)

            events = [e async for e in pb_grpc.DirectiveServiceStub(channel).RunDirective(
                requests(), timeout=10)]
        [event] = events
        assert event.started.directive_id.startswith(
            "RESOURCE_EXHAUSTED: max_directives_per_client limit reached")
        assert not interceptor.directive_slots.running  # every slot given back
    finally:
        await server.stop(0)
