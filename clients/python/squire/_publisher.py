"""Publishing on a leased channel: the buffer of tasks not yet sent, and the
Publish calls that carry them (see ``squire._channel`` for the API).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from squire._errors import SquireError, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._reconnect import Backoff, unavailable
from squire._wire import task_spec
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from squire.api.v1 import squire_pb2_grpc as pb_grpc

MAX_BUFFERED_TASKS = 1024
# Tasks one Publish call carries before it ends and its response
# acknowledges them: what a publisher keeps to resend after a broken call.
MAX_UNACKNOWLEDGED = 8192
MAX_CALL_SECONDS = 2.0  # and a call that sent something ends after this long
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
    ``MAX_UNACKNOWLEDGED`` tasks or ``MAX_CALL_SECONDS``, and its response
    acknowledges them (with a journal: committed). A call that fails with
    UNAVAILABLE (the orchestrator restarts, or fails over) is made again with backoff for
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
        # after MAX_UNACKNOWLEDGED tasks, or once it is MAX_CALL_SECONDS old
        # and has sent something, so its response frees them (and ends an
        # outage: the next one gets its own reattach_timeout).
        ends = time.monotonic() + MAX_CALL_SECONDS
        while True:
            with self.cond:
                while not (self._outbox.pending or self._outbox.closed) and number == self._calls:
                    if self._unacknowledged and time.monotonic() >= ends:
                        return
                    self.cond.wait(MAX_CALL_SECONDS)
                if (
                    number != self._calls or not self._outbox.pending
                    or len(self._unacknowledged) >= MAX_UNACKNOWLEDGED
                    or (self._unacknowledged and time.monotonic() >= ends)
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
