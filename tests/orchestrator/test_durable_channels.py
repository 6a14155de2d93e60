"""Durable leased channels over the network, without processes (issue 15): a
real grpc.aio orchestrator on a real SQLite journal in a temporary
directory, in-test workers on the wire. A restart on the same journal has
the channel again; a subscriber resumes with how many results it has and
gets the rest exactly once (those a broken stream lost from the journal); a
publisher may resend (ids the channel has are left out); nobody coming back
for a restored channel releases it."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
import squire
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._durable import Retention
from orchestrator_service._server import Orchestrator
from squire_kernel.serde import decode, encode

from .conftest import wait_for
from .test_durable import config, fib, journal, running_workers

__all__ = ["journal"]  # the fixture, shared with test_durable


def tasks(ids: range, operation: str = "fib_at") -> pb.PublishRequest:
    return pb.PublishRequest(tasks=[
        pb.TaskSpec(task_id=i, operation=operation, input=encode(i),
                    serializer=pb.SERIALIZER_JSON)
        for i in ids
    ])


async def publish(stub: pb_grpc.ChannelServiceStub, channel_id: str,
                  ids: range) -> pb.PublishResponse:
    request = tasks(ids)
    request.channel_id = channel_id
    response: pb.PublishResponse = await stub.Publish(iter([request]))
    return response


async def read(call: grpc.aio.UnaryStreamCall, upto: int | None = None) -> list[tuple[int, int]]:
    """(task id, value) in the order they came, until the stream ends or
    ``upto`` results are in (then the call is cancelled)."""
    got: list[tuple[int, int]] = []
    async for batch in call:
        got.extend((r.task_id, decode(r.ok.output)) for r in batch.results)
        if upto is not None and len(got) >= upto:
            call.cancel()
            break
    return got


async def test_a_restarted_orchestrator_has_the_channel_and_the_subscriber_resumes(
    journal: str,
) -> None:
    orch = Orchestrator(config(journal))
    port = await orch.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ChannelServiceStub(channel)
        channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id
        async with running_workers(orch, 1):
            assert (await publish(stub, channel_id, range(20))).published == 20
            first = await read(stub.Subscribe(pb.SubscribeRequest(channel_id=channel_id,
                                                                  received=0)), upto=8)
        # Tasks published while no worker runs wait in the queue.
        assert (await publish(stub, channel_id, range(20, 40))).published == 20
    await orch.shutdown()

    again = Orchestrator(config(journal, port))
    await again.start()
    try:
        assert channel_id in again.router.channels and again.durable.channels_resumed == 1
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ChannelServiceStub(channel)
            # A publisher that does not know what its last call delivered sends it again.
            again_sent = await publish(stub, channel_id, range(40))
            assert (again_sent.published, again_sent.duplicates) == (0, 40)
            await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
            async with running_workers(again, 2) as ws:
                rest = await read(stub.Subscribe(
                    pb.SubscribeRequest(channel_id=channel_id, received=len(first))))
            ids = [i for i, _ in first + rest]
            assert sorted(ids) == list(range(40)), "a result was lost or came twice"
            assert all(value == fib(i) for i, value in first + rest)
            # Only what had no journaled result ran on the new orchestrator.
            ran = sum(len(w.executed) for w in ws)
            assert ran <= 40 - len(first)
            await stub.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=channel_id))
        assert not [s for s in await again.store.list_streams() if s.stream_id == channel_id]
    finally:
        await again.shutdown()


async def test_a_subscriber_resumes_from_the_journal_after_a_broken_stream(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.ChannelServiceStub(channel)
            channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id
            async with running_workers(orch, 2):
                await publish(stub, channel_id, range(30))
                await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
                # The first stream took all 30 results; the subscriber got 5 of
                # them before its connection broke.
                everything = await read(stub.Subscribe(
                    pb.SubscribeRequest(channel_id=channel_id, received=0)))
                assert len(everything) == 30
                rest = await read(stub.Subscribe(
                    pb.SubscribeRequest(channel_id=channel_id, received=5)))
            assert rest == everything[5:], "not the same results in the same order"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read(stub.Subscribe(
                    pb.SubscribeRequest(channel_id=channel_id, received=31)))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "claims 31" in (err.value.details() or "")


async def test_a_later_subscriber_displaces_the_earlier_one(journal: str) -> None:
    async with Orchestrator(config(journal)) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.ChannelServiceStub(channel)
            channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id
            old = stub.Subscribe(pb.SubscribeRequest(channel_id=channel_id, received=0))
            await wait_for(lambda: orch.hub.channels[channel_id].subscriber is not None)
            new = stub.Subscribe(pb.SubscribeRequest(channel_id=channel_id, received=0))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await old.read()
            assert err.value.code() is grpc.StatusCode.ABORTED
            assert "another Subscribe call" in (err.value.details() or "")
            async with running_workers(orch, 1):
                await publish(stub, channel_id, range(3))
                await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
                assert sorted(i for i, _ in await read(new)) == [0, 1, 2]


async def test_without_a_journal_sent_results_cannot_be_sent_again() -> None:
    async with Orchestrator(config("memory:")) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{orch.port}") as channel:
            stub = pb_grpc.ChannelServiceStub(channel)
            channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id
            async with running_workers(orch, 1):
                await publish(stub, channel_id, range(4))
                await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
                assert len(await read(stub.Subscribe(
                    pb.SubscribeRequest(channel_id=channel_id)))) == 4
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await read(stub.Subscribe(pb.SubscribeRequest(channel_id=channel_id, received=1)))
            assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "--store memory:" in (err.value.details() or "")


async def test_a_restored_channel_nobody_comes_back_for_is_released(journal: str) -> None:
    short = dataclasses.replace(config(journal), retention=Retention(reattach_grace=0.3))
    orch = Orchestrator(short)
    port = await orch.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ChannelServiceStub(channel)
        channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id
        await publish(stub, channel_id, range(5))
    await orch.shutdown()

    again = Orchestrator(dataclasses.replace(short, port=port))
    await again.start()
    try:
        assert channel_id in again.router.channels
        await wait_for(lambda: channel_id not in again.router.channels, timeout=10)

        async def in_journal() -> bool:
            return any(s.stream_id == channel_id for s in await again.store.list_streams())

        deadline = asyncio.get_running_loop().time() + 10
        while await in_journal():
            assert asyncio.get_running_loop().time() < deadline, "still in the journal"
            await asyncio.sleep(0.05)
    finally:
        await again.shutdown()


async def test_the_async_sdk_channel_rides_out_a_restart(journal: str) -> None:
    orch = Orchestrator(config(journal))
    port = await orch.start()
    target = f"127.0.0.1:{port}"
    again: Orchestrator | None = None
    async with squire.AsyncClient(target) as client:
        async with client.lease_channel() as channel:
            got: dict[int, int] = {}
            async with running_workers(orch, 1):
                await channel.sender.publish("fib_at", range(50))
                async for outcome in channel.receiver:
                    got[outcome.task_id] = outcome.value
                    if len(got) == 10:
                        break
            await orch.shutdown()
            again = Orchestrator(config(journal, port))
            await again.start()
            try:
                async with running_workers(again, 2):
                    assert await channel.sender.close() == 50
                    async for outcome in channel.receiver:
                        assert outcome.task_id not in got, f"task {outcome.task_id} twice"
                        got[outcome.task_id] = outcome.value
                assert got == {i: fib(i - 1) for i in range(1, 51)}
                assert channel.receiver.resubscribed >= 1
            finally:
                await channel.release()
                await again.shutdown()
