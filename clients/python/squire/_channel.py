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
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._errors import SquireError, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._model import TaskOutcome
from squire._reconnect import Backoff, call_retrying, unavailable
from squire._wire import task_outcome, task_spec
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc

MAX_BUFFERED_TASKS = 1024
# Tasks one Publish call carries before it ends and its response
# acknowledges them: what a publisher keeps to resend after a broken call.
MAX_UNACKNOWLEDGED = 8192
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
    """Publish calls on the blocking gRPC stack, fed from a bounded buffer.

    Tasks go out over one Publish call at a time; a call ends after
    ``MAX_UNACKNOWLEDGED`` tasks and its response acknowledges them (with a
    journal: committed). A call that fails with UNAVAILABLE (the orchestrator
    restarts, or fails over) is made again with backoff for
    ``reattach_timeout`` seconds, its unacknowledged tasks sent first again:
    the orchestrator leaves out ids the channel has, so nothing runs twice.

    Thread-safe. :meth:`add` never blocks; it returns None while the buffer
    is full. Waiters learn that room freed up or that publishing ended
    through ``cond`` (blocking sender) or ``on_change``, called from gRPC
    threads (asyncio sender; see ``squire._bridge`` for why it also uses
    this stack).
    """

    def __init__(
        self,
        stub: pb_grpc.ChannelServiceStub,
        channel_id: str,
        serializer: Serializer,
        on_change: Callable[[], None] | None = None,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.cond = threading.Condition()
        self._stub = stub
        self._outbox = _Outbox(channel_id, serializer)
        self._on_change = on_change
        self._reattach_timeout = reattach_timeout
        self._call: Any = None  # the Publish call now open, if any
        self._calls = 0  # calls made: the generator of an older one stops
        self._unacknowledged: list[pb.TaskSpec] = []  # sent on the open call
        self._backoff: Backoff | None = None  # while the orchestrator is away
        self._retry: threading.Timer | None = None
        self._error: BaseException | None = None
        self._aborted = False
        self.published = 0  # tasks the orchestrator added to the channel
        self.duplicates = 0  # tasks it already had (resent after a broken call)
        self.resent = 0  # calls made again after UNAVAILABLE

    @property
    def finished(self) -> bool:
        """True once every task is acknowledged after the end of input, or
        publishing failed."""
        with self.cond:
            return self._error is not None or self._idle_closed()

    def _idle_closed(self) -> bool:
        return (
            self._outbox.closed and not self._outbox.pending and not self._unacknowledged
            and self._call is None and self._retry is None
        )

    def add(
        self,
        operation: str,
        task_id: int | None,
        params: dict[str, Any] | None,
        metadata: bytes,
        **payload: Any,
    ) -> int | None:
        with self.cond:
            if self._error is not None:
                raise self._error
            if self._outbox.full:
                return None
            task_id = self._outbox.add(
                operation, task_id=task_id, params=params, metadata=metadata, **payload
            )
            self._open()
            self.cond.notify_all()
            return task_id

    def end_input(self) -> None:
        with self.cond:
            self._outbox.closed = True
            self.cond.notify_all()

    def result(self) -> int:
        """Tasks acknowledged: each one sent is on the channel (added by its
        call, or already there: ``duplicates``). Blocks until every task is
        acknowledged (call :meth:`end_input` first)."""
        with self.cond:
            while self._error is None and not self._idle_closed():
                self.cond.wait()
            if self._error is not None:
                raise self._error
            return self.published + self.duplicates

    def abort(self) -> None:
        with self.cond:
            self._aborted = True
            self._outbox.closed = True
            self._outbox.pending.clear()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
            call = self._call
            self._changed()
        if call is not None:
            call.cancel()

    def _open(self) -> None:
        """Open a call if tasks wait and none is open (hold ``cond``)."""
        if self._call is None and self._retry is None and not self._aborted and (
            self._outbox.pending
        ):
            self._calls += 1
            self._call = self._stub.Publish.future(self._requests(self._calls))
            self._call.add_done_callback(self._on_call_done)

    def _requests(self, number: int) -> Iterator[pb.PublishRequest]:
        # Pulled by a gRPC thread as flow control allows. The call ends
        # after MAX_UNACKNOWLEDGED tasks, so its response frees them.
        while True:
            with self.cond:
                while not (self._outbox.pending or self._outbox.closed) and number == self._calls:
                    self.cond.wait()
                if (
                    number != self._calls or not self._outbox.pending
                    or len(self._unacknowledged) >= MAX_UNACKNOWLEDGED
                ):
                    return
                request = self._outbox.take()
                self._unacknowledged.extend(request.tasks)
                self._changed()
            yield request

    def _on_call_done(self, call: Any) -> None:
        with self.cond:
            if call is not self._call:
                return
            self._call = None
            self._calls += 1  # its generator, if gRPC still pulls it, stops
            try:
                response: pb.PublishResponse = call.result()
            except grpc.RpcError as exc:
                self._failed(exc)
            except grpc.FutureCancelledError:
                self._error = SquireError(
                    f"publishing on channel {self._outbox.channel_id} was cancelled"
                )
            else:
                self.published += response.published
                self.duplicates += response.duplicates
                self._unacknowledged.clear()
                self._backoff = None
                self._open()
            self._changed()

    def _failed(self, exc: grpc.RpcError) -> None:
        if self._aborted:
            self._error = translate_rpc_error(exc)
            return
        if unavailable(exc) and self._reattach_timeout > 0:
            self._backoff = self._backoff or Backoff(self._reattach_timeout)
            delay = self._backoff.next()
            if delay is not None:
                # What the broken call sent goes first on the next one.
                self._outbox.pending.extendleft(reversed(self._unacknowledged))
                self._unacknowledged.clear()
                self._retry = threading.Timer(delay, self._again)
                self._retry.daemon = True
                self._retry.start()
                return
        self._error = translate_rpc_error(exc)

    def _again(self) -> None:
        with self.cond:
            if self._retry is None:
                return  # aborted meanwhile
            self._retry = None
            self.resent += 1
            self._open()
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
