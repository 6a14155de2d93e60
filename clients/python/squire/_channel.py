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

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._errors import SquireError, translate_rpc_error
from squire._model import TaskOutcome
from squire._wire import task_outcome, task_spec
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc

MAX_BUFFERED_TASKS = 1024
MAX_BYTES_PER_MESSAGE = 4 * 1024 * 1024
MAX_TASKS_PER_MESSAGE = 256


class _Outbox:
    """Task ids and the buffer of tasks not yet handed to gRPC; no I/O."""

    def __init__(self, channel_id: str, serializer: Serializer) -> None:
        self.channel_id = channel_id
        self.serializer = serializer
        self.pending: deque[pb.TaskSpec] = deque()
        self.closed = False
        self._next_id = 1

    @property
    def full(self) -> bool:
        return len(self.pending) >= MAX_BUFFERED_TASKS

    def add(
        self,
        operation: str,
        *,
        task_id: int | None,
        params: dict[str, Any] | None,
        metadata: bytes,
        input: Any = None,
        operands: list[Any] | None = None,
    ) -> int:
        if self.closed:
            raise SquireError(f"the sender of channel {self.channel_id} is closed")
        if task_id is None:
            task_id = self._next_id
        elif task_id < 0:
            raise ValueError(f"task_id must be >= 0, got {task_id}")
        spec = task_spec(
            task_id=task_id,
            operation=operation,
            serializer=self.serializer,
            params=params,
            metadata=metadata,
            input=input,
            operands=operands,
        )
        self.pending.append(spec)
        self._next_id = max(self._next_id, task_id + 1)
        return task_id

    def take(self) -> pb.PublishRequest:
        """The next message: at most MAX_TASKS_PER_MESSAGE tasks and about
        MAX_BYTES_PER_MESSAGE bytes (always at least one task), far below
        the 64 MiB message limit."""
        tasks: list[pb.TaskSpec] = []
        size = 0
        pending = self.pending
        while pending and len(tasks) < MAX_TASKS_PER_MESSAGE:
            n = pending[0].ByteSize()
            if tasks and size + n > MAX_BYTES_PER_MESSAGE:
                break
            tasks.append(pending.popleft())
            size += n
        return pb.PublishRequest(channel_id=self.channel_id, tasks=tasks)


class Publisher:
    """One Publish call on the blocking gRPC stack, fed from a bounded buffer.

    Thread-safe. :meth:`add` never blocks; it returns None while the buffer
    is full. Waiters learn that room freed up or that the call ended through
    ``cond`` (blocking sender) or ``on_change``, called from gRPC threads
    (asyncio sender; see ``squire._bridge`` for why it also uses this stack).
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.cond = threading.Condition()
        self._stub = stub
        self._outbox = _Outbox(channel_id, serializer)
        self._on_change = on_change
        self._call: Any = None  # opened by the first task
        self._call_done = False

    @property
    def finished(self) -> bool:
        """True once the Publish call ended (or was never needed)."""
        return self._call is None or self._call_done

    def add(
        self,
        operation: str,
        task_id: int | None,
        params: dict[str, Any] | None,
        metadata: bytes,
        **payload: Any,
    ) -> int | None:
        with self.cond:
            if self._call_done:
                self.result()  # raises why the call ended
                raise SquireError(
                    f"the orchestrator ended the Publish stream of channel "
                    f"{self._outbox.channel_id} early"
                )
            if self._outbox.full:
                return None
            task_id = self._outbox.add(
                operation, task_id=task_id, params=params, metadata=metadata, **payload
            )
            if self._call is None:
                self._call = self._stub.Publish.future(self._requests())
                self._call.add_done_callback(self._on_call_done)
            self.cond.notify_all()
            return task_id

    def end_input(self) -> None:
        with self.cond:
            self._outbox.closed = True
            self.cond.notify_all()

    def result(self) -> int:
        """Tasks the orchestrator accepted; blocks until the call ends."""
        if self._call is None:
            return 0
        try:
            response: pb.PublishResponse = self._call.result()
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return response.published

    def abort(self) -> None:
        self.end_input()
        if self._call is not None:
            self._call.cancel()

    def _requests(self) -> Iterator[pb.PublishRequest]:
        # Pulled by a gRPC thread as flow control allows.
        while True:
            with self.cond:
                while not (self._outbox.pending or self._outbox.closed or self._call_done):
                    self.cond.wait()
                if not self._outbox.pending or self._call_done:
                    return
                request = self._outbox.take()
                self._changed()
            yield request

    def _on_call_done(self, _call: Any) -> None:
        with self.cond:
            self._call_done = True
            self._changed()

    def _changed(self) -> None:
        self.cond.notify_all()
        if self._on_change is not None:
            self._on_change()


# ---------------------------------------------------------------- blocking


class ChannelSender:
    """Publishes tasks on one channel. Thread-safe.

    Task ids are unique within the channel: ``send`` picks the next id above
    every id used so far unless you pass one. Results echo ``metadata``.
    """

    def __init__(
        self, stub: pb_grpc.ChannelServiceStub, channel_id: str, serializer: Serializer
    ) -> None:
        self._stub = stub
        self._channel_id = channel_id
        self._publisher = Publisher(stub, channel_id, serializer)
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
        result. Returns how many tasks the orchestrator accepted. Idempotent.
        """
        if self._published is None:
            self._publisher.end_input()
            published = self._publisher.result()
            try:
                self._stub.CloseChannel(pb.CloseChannelRequest(channel_id=self._channel_id))
            except grpc.RpcError as exc:
                raise translate_rpc_error(exc) from exc
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
    """

    def __init__(
        self, stub: pb_grpc.ChannelServiceStub, channel_id: str, serializer: Serializer
    ) -> None:
        self._stub = stub
        self._channel_id = channel_id
        self._serializer = serializer
        self._buffer: deque[TaskOutcome] = deque()
        self._call: Any = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> TaskOutcome:
        while not self._buffer:
            if self._call is None:
                self._call = self._stub.Subscribe(pb.SubscribeRequest(channel_id=self._channel_id))
            try:
                batch: pb.ResultBatch = next(self._call)
            except grpc.RpcError as exc:
                raise translate_rpc_error(exc) from exc
            self._buffer.extend(task_outcome(r, self._serializer) for r in batch.results)
        return self._buffer.popleft()

    def cancel(self) -> None:
        """Stop receiving (the channel itself stays leased)."""
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
        self, stub: pb_grpc.ChannelServiceStub, channel_id: str, serializer: Serializer
    ) -> None:
        self.channel_id = channel_id
        self.serializer = serializer
        self.sender = ChannelSender(stub, channel_id, serializer)
        self.receiver = ChannelReceiver(stub, channel_id, serializer)
        self._stub = stub
        self._released = False

    def release(self) -> None:
        """Free the channel. Idempotent."""
        if self._released:
            return
        self._released = True
        self.sender._publisher.abort()
        self.receiver.cancel()
        try:
            self._stub.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=self.channel_id))
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc

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
