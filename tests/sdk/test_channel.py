"""The low-level channel API: lease, publish, close, receive, release."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest
from squire import (
    AsyncClient,
    Client,
    FatalStrategy,
    NotFound,
    SquireError,
    TaskFailure,
    TaskOutcome,
)
from squire.api.v1 import squire_pb2 as pb

from .fake_orchestrator import FakeServer

FIB_1_TO_10 = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]


def test_publish_close_receive_release(client: Client, fake: FakeServer) -> None:
    with client.lease_channel() as channel:
        assert channel.channel_id == "channel-1"
        ids = channel.sender.publish("fib_at", range(1, 11), metadata=b"fib")
        doubled = channel.sender.send("multiply_by", 21, params={"factor": 2}, metadata=b"x2")
        summed = channel.sender.combine("sum", [1, 2, 3])
        assert channel.sender.close() == 12
        outcomes = {outcome.task_id: outcome for outcome in channel.receiver}

    assert ids == list(range(1, 11))
    assert [outcomes[i].value for i in ids] == FIB_1_TO_10
    assert outcomes[ids[0]].metadata == b"fib"
    assert outcomes[doubled] == TaskOutcome(task_id=doubled, metadata=b"x2", value=42)
    assert outcomes[summed].value == 6 and outcomes[summed].ok
    assert fake.servicer.released == ["channel-1"]

    tasks = {task.task_id: task for task in fake.servicer.published["channel-1"]}
    assert tasks[doubled].params == b'{"factor":2}'
    assert tasks[ids[0]].params == b""
    assert tasks[summed].kind == pb.TASK_KIND_COMBINE
    assert tasks[summed].operands == [b"1", b"2", b"3"]


def test_a_failed_task_is_data(client: Client) -> None:
    with client.lease_channel() as channel:
        task_id = channel.sender.send("fib_at", "not a number")
        channel.sender.close()
        (outcome,) = list(channel.receiver)
    assert outcome.task_id == task_id
    assert not outcome.ok and outcome.value is None
    assert outcome.error == TaskFailure(
        error_type="TypeError",
        message="'str' object cannot be interpreted as an integer",
        kind="operation",
        strategy=FatalStrategy.TERMINATE,
    )


def test_task_ids_continue_above_explicit_ones(client: Client) -> None:
    with client.lease_channel() as channel:
        assert channel.sender.send("fib_at", 1, task_id=100) == 100
        assert channel.sender.send("fib_at", 2) == 101
        assert channel.sender.send("fib_at", 3, task_id=7) == 7
        assert channel.sender.send("fib_at", 4) == 102
        channel.sender.close()
        assert sorted(o.task_id for o in channel.receiver) == [7, 100, 101, 102]


def test_more_tasks_than_the_local_buffer_holds(client: Client, fake: FakeServer) -> None:
    # Receive on another thread while publishing, as a real producer would.
    received: list[int] = []
    with client.lease_channel(serializer="msgpack") as channel:
        reader = threading.Thread(target=lambda: received.extend(o.value for o in channel.receiver))
        reader.start()
        channel.sender.publish("multiply_by", range(5000), params={"factor": 3})
        assert channel.sender.close() == 5000
        reader.join(timeout=30)
    assert sorted(received) == [3 * i for i in range(5000)]


def test_closing_twice_and_releasing_twice_are_harmless(client: Client) -> None:
    channel = client.lease_channel()
    assert channel.sender.close() == 0
    assert channel.sender.close() == 0
    assert list(channel.receiver) == []
    channel.release()
    channel.release()
    with pytest.raises(SquireError, match="closed"):
        channel.sender.send("fib_at", 1)


def test_an_unknown_channel_is_not_found(client: Client, fake: FakeServer) -> None:
    channel = client.lease_channel()
    fake.servicer.channels.clear()  # as if released by someone else
    channel.sender.send("fib_at", 1)
    with pytest.raises(NotFound, match="unknown channel 'channel-1'"):
        channel.sender.close()
    with pytest.raises(NotFound):
        list(channel.receiver)
    with pytest.raises(NotFound):
        channel.release()


# ------------------------------------------------------------------ async


async def test_async_channel_round_trip(aclient: AsyncClient, fake: FakeServer) -> None:
    async def inputs() -> AsyncIterator[int]:
        for n in range(1, 11):
            yield n

    async with aclient.lease_channel() as channel:
        ids = await channel.sender.publish("fib_at", inputs())
        concat = await channel.sender.combine("concat", ["a", "b"], metadata=b"m")
        assert await channel.sender.close() == 11
        outcomes = {o.task_id: o async for o in channel.receiver}
    assert [outcomes[i].value for i in ids] == FIB_1_TO_10
    assert outcomes[concat] == TaskOutcome(task_id=concat, metadata=b"m", value="ab")
    assert fake.servicer.released == [channel.channel_id]


async def test_async_backpressure_and_await_lease(aclient: AsyncClient) -> None:
    channel = await aclient.lease_channel(serializer="msgpack")
    try:
        await channel.sender.publish("length", ["x" * (i % 7) for i in range(3000)])
        assert await channel.sender.close() == 3000
        values = [o.value async for o in channel.receiver]
    finally:
        await channel.release()
    assert sorted(values) == sorted(i % 7 for i in range(3000))


async def test_async_unknown_channel(aclient: AsyncClient, fake: FakeServer) -> None:
    channel = await aclient.lease_channel()
    fake.servicer.channels.clear()
    await channel.sender.send("fib_at", 1)
    with pytest.raises(NotFound):
        await channel.sender.close()
    with pytest.raises(NotFound):
        await channel.release()


def test_publish_messages_are_cut_by_bytes() -> None:
    from squire._publisher import MAX_BYTES_PER_MESSAGE, _Outbox
    from squire.api.v1 import squire_pb2 as pb

    from squire_kernel.serde import Serializer

    outbox = _Outbox("c1", Serializer.JSON)
    for i in range(100):
        outbox.pending.append(pb.TaskSpec(task_id=i, operation="op", input=b"x" * (1 << 20)))
    sizes = []
    while outbox.pending:
        sizes.append(outbox.take().ByteSize())
    # 100 tasks of 1 MiB: never one 100 MiB message (past the 64 MiB limit)
    assert max(sizes) <= MAX_BYTES_PER_MESSAGE + 1024
    assert len(sizes) >= 25
