"""Leased result channels: the low-level API every gRPC client gets.

A channel is a fresh routing key. Tasks published on it carry that key, and
their results come back on it only, in completion order::

    with client.lease_channel() as channel:          # released on exit
        channel.sender.publish("fib_at", range(1, 11))
        channel.sender.close()                       # no more tasks
        for outcome in channel.receiver:             # ends after the last result
            print(outcome.task_id, outcome.value if outcome.ok else outcome.error)

    async with aclient.lease_channel() as channel:   # the same with asyncio
        await channel.sender.publish("fib_at", range(1, 11))
        await channel.sender.close()
        async for outcome in channel.receiver:
            ...

The sender streams tasks over one Publish call, opened with the first task and
batched as fast as the orchestrator takes them; when it slows down (its queue
is full) ``send`` blocks once a bounded local buffer is full too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._errors import translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._model import TaskOutcome
from squire._publisher import Publisher
from squire._reconnect import Backoff, call_retrying, subscribed, unavailable
from squire._wire import task_outcome
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc



# ---------------------------------------------------------------- blocking


class ChannelSender:
    """Publishes tasks on one channel. Thread-safe.

    Task ids are unique within the channel: ``send`` picks the next id above
    every id used so far unless you pass one. Results echo ``metadata``.
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self._stub = stub
        self._channel_id = channel_id
        self._reattach_timeout = reattach_timeout
        self._publisher = Publisher(
            stub, channel_id, serializer, reattach_timeout=reattach_timeout
        )
        self._published: int | None = None

    def send(
        self,
        operation: str,
        input: Any,
        *,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> int:
        """Queue ``operation(input, **params)``; return its task id."""
        return self._add(operation, task_id, params, metadata, input=input)

    def combine(
        self,
        monoid: str,
        operands: list[Any],
        *,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> int:
        """Queue a combine task: ``monoid`` over ``operands`` left to right."""
        return self._add(monoid, task_id, params, metadata, operands=list(operands))

    def publish(
        self,
        operation: str,
        inputs: Iterable[Any],
        *,
        params: dict[str, Any] | None = None,
        metadata: bytes = b"",
    ) -> list[int]:
        """:meth:`send` every element of ``inputs``; return their task ids in order."""
        return [self.send(operation, value, params=params, metadata=metadata) for value in inputs]

    def close(self) -> int:
        """No more tasks: finish publishing, then close the sender on the orchestrator.

        The receiver's iteration ends once every published task has its
        result. Returns how many tasks the orchestrator acknowledged: every
        one sent, including those it already had (a task resent after the
        orchestrator restarted counts once). Idempotent.
        """
        if self._published is None:
            self._publisher.end_input()
            published = self._publisher.result()
            call_retrying(
                lambda: self._stub.CloseChannel(
                    pb.CloseChannelRequest(channel_id=self._channel_id)
                ),
                self._reattach_timeout,
            )
            self._published = published
        return self._published

    def _add(
        self,
        operation: str,
        task_id: int | None,
        params: dict[str, Any] | None,
        metadata: bytes,
        **payload: Any,
    ) -> int:
        publisher = self._publisher
        with publisher.cond:
            while (added := publisher.add(operation, task_id, params, metadata, **payload)) is None:
                publisher.cond.wait()
            return added


class ChannelReceiver:
    """The channel's results as :class:`TaskOutcome` values, in completion order.

    Iterate it once, from one thread. Subscribe opens with the first ``next``;
    the iteration ends once the sender is closed and every task has its result.
    If the stream breaks with UNAVAILABLE (the orchestrator restarts or fails
    over), it subscribes again, with backoff for ``reattach_timeout``
    seconds, naming how many results it has: it gets the rest, each once.
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceStub,
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

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> TaskOutcome:
        while not self._buffer:
            if self._call is None:
                self._call = self._stub.Subscribe(
                    pb.SubscribeRequest(channel_id=self._channel_id, received=self.received)
                )
                if subscribed(self._call.initial_metadata()):
                    self._backoff = None  # an outage is over; the next gets its own time
            try:
                batch: pb.ResultBatch = next(self._call)
            except grpc.RpcError as exc:
                self._call = None
                delay = self._retry_delay(exc)
                if delay is None:
                    raise translate_rpc_error(exc) from exc
                time.sleep(delay)
                self.resubscribed += 1
                continue
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


class ChannelHandle:
    """A leased channel: ``sender`` publishes tasks, ``receiver`` yields results.

    :meth:`release` (or leaving the ``with`` block) frees the channel: the
    orchestrator drops its queued tasks and aborts running ones, and results
    not yet received are lost. Close the sender and drain the receiver first
    to get every result.
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.channel_id = channel_id
        self.serializer = serializer
        self.sender = ChannelSender(
            stub, channel_id, serializer, reattach_timeout=reattach_timeout
        )
        self.receiver = ChannelReceiver(
            stub, channel_id, serializer, reattach_timeout=reattach_timeout
        )
        self._stub = stub
        self._reattach_timeout = reattach_timeout
        self._released = False

    def release(self) -> None:
        """Free the channel. Idempotent."""
        if self._released:
            return
        self._released = True
        self.sender._publisher.abort()
        self.receiver.cancel()
        # NOT_FOUND on a retry: the first attempt released it before its
        # answer was lost.
        call_retrying(
            lambda: self._stub.ReleaseChannel(
                pb.ReleaseChannelRequest(channel_id=self.channel_id)
            ),
            self._reattach_timeout,
            done_if=grpc.StatusCode.NOT_FOUND,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"ChannelHandle({self.channel_id!r})"
