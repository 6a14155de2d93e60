"""IndexedStream through an AsyncClient: run_async, aiter, aevents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from squire import (
    AsyncClient,
    Cancelled,
    DirectiveFailed,
    DirectiveStarted,
    FoldValue,
    IndexedStream,
    Progress,
    ResourceExhausted,
    Skipped,
)

from .fake_orchestrator import FakeServer

FIB_1_TO_10 = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]


async def test_run_async_map_and_fold(aclient: AsyncClient) -> None:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at")
    assert await stream.run_async(aclient) == FIB_1_TO_10
    assert await stream.fold("sum").run_async(aclient) == 143
    assert await stream.map("multiply_by", factor=2).fold("sum").run_async(aclient) == 286


async def test_aiter_yields_in_completion_order(aclient: AsyncClient) -> None:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at")
    pairs = [pair async for pair in stream.aiter(aclient)]
    assert pairs == [(i, FIB_1_TO_10[i]) for i in reversed(range(10))]


async def test_async_iterable_inputs_and_msgpack(aclient: AsyncClient) -> None:
    async def words() -> AsyncIterator[str]:
        for word in ["a", "bb", "ccc"]:
            yield word

    stream = IndexedStream.from_iterable(words()).map("length")
    assert await stream.run_async(aclient, serializer="msgpack") == [1, 2, 3]


async def test_skipped_and_progress_through_aevents(aclient: AsyncClient, fake: FakeServer) -> None:
    fake.servicer.script.skip_indices = {0}
    stream = IndexedStream.from_iterable([5, 6]).map("fib_at")
    async with stream.aevents(aclient) as run:
        events = [event async for event in run]
    assert events[0] == DirectiveStarted("directive-1")
    assert run.progress == Progress(received=2, completed=2, skipped=1, total=2, tasks_done=2)
    assert await stream.run_async(aclient) == [Skipped(0, "ValueError: skip 0"), 8]


async def test_async_fold_event(aclient: AsyncClient) -> None:
    stream = IndexedStream.from_iterable(["x", "y"]).fold("concat")
    events = [event async for event in stream.aevents(aclient)]
    assert events[-1] == FoldValue("xy")


async def test_directive_failed_async(aclient: AsyncClient, fake: FakeServer) -> None:
    fake.servicer.script.fail_index = 0
    with pytest.raises(DirectiveFailed, match=r"^Fatal operation error: "):
        await IndexedStream.from_iterable([1]).map("fib_at").run_async(aclient)


async def test_an_error_in_an_async_input_is_raised_as_is(aclient: AsyncClient) -> None:
    async def inputs() -> AsyncIterator[int]:
        for i in range(300):
            yield i
        raise RuntimeError("the input broke")

    with pytest.raises(RuntimeError, match="the input broke"):
        await IndexedStream.from_iterable(inputs()).map("fib_at").run_async(aclient)


async def test_async_results_flow_back_before_the_input_ends(aclient: AsyncClient) -> None:
    first_result = asyncio.Event()

    async def inputs() -> AsyncIterator[int]:
        for i in range(5000):
            if i == 1000:
                await asyncio.wait_for(first_result.wait(), timeout=20)
            yield i

    stream = IndexedStream.from_iterable(inputs()).map("multiply_by", factor=3)
    async with contextlib.aclosing(stream.aiter(aclient)) as results:
        first = await anext(results)
        first_result.set()
        rest = [pair async for pair in results]
    assert sorted([first, *rest]) == [(i, 3 * i) for i in range(5000)]


async def test_a_large_sync_generator_is_streamed_by_the_async_client(
    aclient: AsyncClient, fake: FakeServer
) -> None:
    fake.servicer.script.abort_after_batches = (1, grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
    consumed = 0

    def inputs() -> Iterator[int]:
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield i

    with pytest.raises(ResourceExhausted):
        await IndexedStream.from_iterable(inputs()).map("fib_at").run_async(aclient)
    assert 256 <= consumed < 500_000


async def test_cancelling_a_run_raises_cancelled(aclient: AsyncClient, fake: FakeServer) -> None:
    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    run = IndexedStream.from_iterable(endless()).map("fib_at").aevents(aclient)
    assert isinstance(await anext(run), DirectiveStarted)
    run.cancel()
    with pytest.raises(Cancelled):
        await anext(run)
