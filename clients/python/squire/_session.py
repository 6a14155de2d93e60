"""Small directives over one long-lived RunDirectives stream.

A new RPC per directive costs more than the directive itself when it has a
handful of elements. The blocking :class:`Client` therefore runs directives
whose inputs are a short, already materialized sequence (at most
``SESSION_MAX_ITEMS``) as calls of one shared session stream: the plan, the
inputs and the end of input go out in one message, and the call's events
come back in one. Everything else uses its own RunDirective call, which
streams inputs lazily with flow control.

The session opens lazily, is shared by every thread using the client, and is
re-opened after it breaks; calls in flight when it breaks raise
:class:`squire.Unavailable` (or the status the stream ended with).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._directive import DirectiveRun
from squire._errors import RpcError, Unavailable, rpc_error, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._model import DirectiveEvent, DirectiveStarted, Plan, Progress
from squire._wire import ItemSink, Tally, directive_event, plan_request
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.serde import encode

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc

SESSION_MAX_ITEMS = 64
CLOSED = "the directive session was closed"  # by this client
ENDED = "the directive session stream ended"

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

_Inbox = deque[pb.SessionEvent | RpcError]


class DirectiveSession:
    """The shared RunDirectives stream of one :class:`squire.Client`.

    There is no reader thread: a caller waiting for its call's next message
    reads the stream itself when nobody else is reading (leader/follower),
    delivers what it read to the call it belongs to, and lets the next
    waiter take over. A message therefore reaches a lone caller straight
    from gRPC's own thread, without one more thread hop per message.
    """

    def __init__(self, stub: pb_grpc.DirectiveServiceStub) -> None:
        self.stub = stub
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Inbox] = {}
        self._requests: queue.SimpleQueue[pb.SessionRequest | None] | None = None
        self._stream: Any = None
        self._reading = False  # a caller is reading the stream now

    def start(self, request: pb.SessionRequest) -> int:
        with self._cond:
            if self._requests is None:
                self._open()
            assert self._requests is not None
            call_id = next(self._ids)
            request.call_id = call_id
            self._calls[call_id] = deque()
            self._requests.put(request)
        return call_id

    def receive(self, call_id: int) -> pb.SessionEvent | RpcError:
        """The call's next message, or the error that ended the stream."""
        while True:
            with self._cond:
                while True:
                    inbox = self._calls.get(call_id)
                    if inbox is None:
                        return Unavailable(CLOSED, "UNAVAILABLE")
                    if inbox:
                        return inbox.popleft()
                    if not self._reading:
                        break
                    self._cond.wait()
                self._reading = True
                stream = self._stream
            self._read_one(stream)

    def _read_one(self, stream: Any) -> None:
        """Read one message as the session's reader, deliver it, hand over."""
        message: pb.SessionEvent | None = None
        error: RpcError | None = None
        if stream is None:
            error = Unavailable(CLOSED, "UNAVAILABLE")
        else:
            try:
                message = next(stream)
            except StopIteration:
                error = Unavailable(ENDED, "UNAVAILABLE")
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc)
            except BaseException:
                with self._cond:
                    self._reading = False
                    self._cond.notify_all()
                raise
        with self._cond:
            self._reading = False
            if message is not None:
                inbox = self._calls.get(message.call_id)
                if inbox is not None:
                    inbox.append(message)
            else:
                assert error is not None
                if self._stream is stream:  # broken, not closed: the next call re-opens
                    self._requests = self._stream = None
                # Every call still open learns why (each removes itself when
                # it reads the error: see SessionRun).
                for inbox in self._calls.values():
                    inbox.append(error)
            self._cond.notify_all()

    def cancel(self, call_id: int) -> None:
        with self._cond:
            if self._calls.pop(call_id, None) is not None and self._requests is not None:
                self._requests.put(pb.SessionRequest(call_id=call_id, cancel=True))

    def done(self, call_id: int) -> None:
        with self._cond:
            self._calls.pop(call_id, None)

    def close(self) -> None:
        with self._cond:
            requests, stream = self._requests, self._stream
            self._requests = self._stream = None
            error = Unavailable(CLOSED, "UNAVAILABLE")
            for inbox in self._calls.values():
                inbox.append(error)
            self._cond.notify_all()
        if requests is not None:
            requests.put(None)  # half-close: the server cancels nothing that finished
        if stream is not None:
            stream.cancel()

    def _open(self) -> None:
        requests: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()

        def outgoing() -> Iterator[pb.SessionRequest]:
            while (request := requests.get()) is not None:
                yield request

        self._stream = self.stub.RunDirectives(outgoing())
        self._requests = requests


class SessionRun:
    """A small directive on the client's session; behaves like DirectiveRun."""

    def __init__(
        self,
        session: DirectiveSession,
        plan: Plan,
        inputs: Sequence[Any],
        *,
        items_to: ItemSink | None = None,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.plan = plan
        self.directive_id: str | None = None
        self.progress: Progress | None = None
        self.finished = False
        self._items_to = items_to
        request = pb.SessionRequest(plan=plan_request(plan).plan, end_input=True)
        serializer = plan.serializer
        items = [encode(value, serializer) for value in inputs]  # raises before sending
        if items:
            request.inputs.items.extend(items)
        self._sent = len(items)
        self._items = items  # kept: a reattach after an orchestrator restart may resend them
        self._tally = Tally()  # items received: values and skipped elements
        self._resumed: DirectiveRun | None = None
        self._reattach_timeout = reattach_timeout
        self._session = session
        self._call_id = session.start(request)
        self._pending: list[DirectiveEvent] = []

    @property
    def inputs_sent(self) -> int:
        return self._sent

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> DirectiveEvent:
        try:
            return self._next()
        except KeyboardInterrupt:
            self.cancel()
            # as DirectiveRun: the caller's traceback shows no grpc frames
            raise KeyboardInterrupt from None

    def _next(self) -> DirectiveEvent:
        if self._resumed is not None:
            resumed = next(self._resumed)
            self.progress = self._resumed.progress
            return resumed
        while not self._pending:
            if self.finished:
                raise StopIteration
            message = self._session.receive(self._call_id)
            if isinstance(message, RpcError):
                self._session.done(self._call_id)
                if self._may_reattach(message):
                    # The orchestrator went away: go on with a call of its own.
                    self._resumed = DirectiveRun.resume(
                        self._session.stub, self.plan, self.directive_id or "",
                        sent=self._items, values=self._tally.values, skipped=self._tally.skipped,
                        first=message, items_to=self._items_to,
                        reattach_timeout=self._reattach_timeout,
                    )
                    return next(self)
                self.finished = True
                raise message
            for raw in message.events:
                event = directive_event(raw, self.plan.serializer, self._items_to, self._tally)
                if isinstance(event, DirectiveStarted):
                    self.directive_id = event.directive_id
                elif isinstance(event, Progress):
                    self.progress = event
                if event is not None:
                    self._pending.append(event)
            if message.HasField("end"):
                self.finished = True
                self._session.done(self._call_id)
                if message.end.code != 0:
                    name = _CODE_NAMES.get(message.end.code, "UNKNOWN")
                    raise rpc_error(name, message.end.message)
        return self._pending.pop(0)

    def _may_reattach(self, error: RpcError) -> bool:
        return (
            error.code == "UNAVAILABLE"
            and error.message not in (CLOSED, ENDED)
            and self.directive_id is not None
            and self._reattach_timeout > 0
        )

    def cancel(self) -> None:
        if self._resumed is not None:
            self._resumed.cancel()
        if not self.finished:
            self.finished = True
            self._session.cancel(self._call_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
