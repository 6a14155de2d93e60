"""The asyncio flavour of the channel API; see :mod:`squire._channel`.

Publishing runs on the blocking gRPC stack (``squire._bridge`` says why);
leasing, closing, releasing and receiving use ``grpc.aio``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from squire._bridge import call_soon
from squire._errors import Cancelled, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._model import TaskOutcome
from squire._publisher import Publisher
from squire._reconnect import Backoff, acall_retrying, subscribed, unavailable
from squire._wire import task_outcome
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc


def _locally_cancelled(call: Any) -> bool:
    """grpc.aio raises CancelledError for a call we cancelled; tell it from task cancellation."""
    task = asyncio.current_task()
    return bool(call.cancelled()) and not (task is not None and task.cancelling())


class AsyncChannelSender:
    """The asyncio twin of :class:`ChannelSender` (methods are coroutines).

    Publishing runs on the blocking gRPC stack in gRPC's threads; waiting for
    room in the buffer or for the end of the call happens on the event loop.
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceAsyncStub,
        blocking_stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._stub = stub
        self._channel_id = channel_id
        self._reattach_timeout = reattach_timeout
        self._changed = asyncio.Event()
        self._publisher = Publisher(
            blocking_stub, channel_id, serializer, lambda: call_soon(loop, self._changed.set),
            reattach_timeout=reattach_timeout,
        )
        self._published: int | None = None

    async def send(
        self,
        operation: str,
        input: Any,
        *,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> int:
        """Queue ``operation(input, **params)``; return its task id."""
        return await self._add(operation, task_id, params, metadata, input=input)

    async def combine(
        self,
        monoid: str,
        operands: list[Any],
        *,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> int:
        """Queue a combine task: ``monoid`` over ``operands`` left to right."""
        return await self._add(monoid, task_id, params, metadata, operands=list(operands))

    async def publish(
        self,
        operation: str,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> list[int]:
        """:meth:`send` every element of ``inputs``; return their task ids in order."""
        if isinstance(inputs, AsyncIterable):
            return [
                await self.send(operation, value, params=params, metadata=metadata)
                async for value in inputs
            ]
        return [
            await self.send(operation, value, params=params, metadata=metadata) for value in inputs
        ]

    async def close(self) -> int:
        """No more tasks; see :meth:`ChannelSender.close`. Idempotent."""
        if self._published is None:
            self._publisher.end_input()
            while True:
                self._changed.clear()
                if self._publisher.finished:
                    break
                await self._changed.wait()
            published = self._publisher.result()  # publishing ended: returns at once
            await acall_retrying(
                lambda: self._stub.CloseChannel(
                    pb.CloseChannelRequest(channel_id=self._channel_id)
                ),
                self._reattach_timeout,
            )
            self._published = published
        return self._published

    async def _add(
        self,
        operation: str,
        task_id: int | None,
        params: dict[str, Any] | None,
        metadata: bytes,
        **payload: Any,
    ) -> int:
        while True:
            self._changed.clear()
            added = self._publisher.add(operation, task_id, params, metadata, **payload)
            if added is not None:
                return added
            await self._changed.wait()


class AsyncChannelReceiver:
    """The asyncio twin of :class:`ChannelReceiver`: ``async for outcome in receiver``
    (it subscribes again after UNAVAILABLE, as that one does)."""

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceAsyncStub,
        channel_id: str,
        serializer: Serializer,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self._stub = stub
        self._channel_id = channel_id
        self._serializer = serializer
        self._reattach_timeout = reattach_timeout
        self._buffer: deque[TaskOutcome] = deque()
        self._call: Any = None
        self._backoff: Backoff | None = None
        self._cancelled = False
        self.received = 0  # results received, over every Subscribe call
        self.resubscribed = 0  # times it subscribed again after UNAVAILABLE

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TaskOutcome:
        while not self._buffer:
            if self._call is None:
                self._call = self._stub.Subscribe(
                    pb.SubscribeRequest(channel_id=self._channel_id, received=self.received)
                )
            call = self._call
            try:
                if self._backoff is not None and subscribed(await call.initial_metadata()):
                    self._backoff = None  # an outage is over; the next gets its own time
                batch = await call.read()
            except grpc.RpcError as exc:
                self._call = None
                delay = self._retry_delay(exc)
                if delay is None:
                    raise translate_rpc_error(exc) from exc
                await asyncio.sleep(delay)
                self.resubscribed += 1
                continue
            except asyncio.CancelledError as exc:
                if not _locally_cancelled(call):
                    raise
                raise Cancelled("receiving was cancelled by the client", "CANCELLED") from exc
            if batch is grpc.aio.EOF:
                raise StopAsyncIteration
            self._backoff = None
            self.received += len(batch.results)
            self._buffer.extend(task_outcome(r, self._serializer) for r in batch.results)
        return self._buffer.popleft()

    def _retry_delay(self, exc: grpc.RpcError) -> float | None:
        if self._cancelled or not unavailable(exc) or self._reattach_timeout <= 0:
            return None
        self._backoff = self._backoff or Backoff(self._reattach_timeout)
        return self._backoff.next()

    def cancel(self) -> None:
        """Stop receiving (the channel itself stays leased)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()


class AsyncChannelHandle:
    """The asyncio twin of :class:`ChannelHandle`; ``await handle.release()``."""

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceAsyncStub,
        blocking_stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.channel_id = channel_id
        self.serializer = serializer
        self.sender = AsyncChannelSender(
            stub, blocking_stub, channel_id, serializer, reattach_timeout=reattach_timeout
        )
        self.receiver = AsyncChannelReceiver(
            stub, channel_id, serializer, reattach_timeout=reattach_timeout
        )
        self._stub = stub
        self._reattach_timeout = reattach_timeout
        self._released = False

    async def release(self) -> None:
        """Free the channel; see :meth:`ChannelHandle.release`. Idempotent."""
        if self._released:
            return
        self._released = True
        self.sender._publisher.abort()
        self.receiver.cancel()
        await acall_retrying(
            lambda: self._stub.ReleaseChannel(
                pb.ReleaseChannelRequest(channel_id=self.channel_id)
            ),
            self._reattach_timeout,
            done_if=grpc.StatusCode.NOT_FOUND,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"AsyncChannelHandle({self.channel_id!r})"


class AsyncLease:
    """What ``AsyncClient.lease_channel()`` returns: await it for a handle, or
    ``async with`` it to have the channel released on exit."""

    def __init__(self, lease: Callable[[], Awaitable[AsyncChannelHandle]]) -> None:
        self._lease = lease
        self._handle: AsyncChannelHandle | None = None

    def __await__(self) -> Generator[Any, None, AsyncChannelHandle]:
        return self._open().__await__()

    async def _open(self) -> AsyncChannelHandle:
        return await self._lease()

    async def __aenter__(self) -> AsyncChannelHandle:
        self._handle = await self._lease()
        return self._handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            await self._handle.release()
