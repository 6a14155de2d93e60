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
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._client import rpc_error, translate_rpc_error
from squire._errors import RpcError, Unavailable
from squire._model import DirectiveEvent, DirectiveStarted, Plan, Progress
from squire._serde import encode
from squire._wire import directive_event, plan_request
from squire.api.v1 import squire_pb2 as pb

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc

SESSION_MAX_ITEMS = 64
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}

_Inbox = queue.SimpleQueue[pb.SessionEvent | RpcError]


class DirectiveSession:
    """The shared RunDirectives stream of one :class:`squire.Client`."""

    def __init__(self, stub: pb_grpc.DirectiveServiceStub) -> None:
        self._stub = stub
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Inbox] = {}
        self._requests: queue.SimpleQueue[pb.SessionRequest | None] | None = None
        self._stream: Any = None
        self._reader: threading.Thread | None = None

    def start(self, request: pb.SessionRequest) -> tuple[int, _Inbox]:
        inbox: _Inbox = queue.SimpleQueue()
        with self._lock:
            if self._requests is None:
                self._open()
            assert self._requests is not None
            call_id = next(self._ids)
            request.call_id = call_id
            self._calls[call_id] = inbox
            self._requests.put(request)
        return call_id, inbox

    def cancel(self, call_id: int) -> None:
        with self._lock:
            if self._calls.pop(call_id, None) is not None and self._requests is not None:
                self._requests.put(pb.SessionRequest(call_id=call_id, cancel=True))

    def done(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def close(self) -> None:
        with self._lock:
            requests, stream, reader = self._requests, self._stream, self._reader
            self._requests = self._stream = self._reader = None
        if requests is not None:
            requests.put(None)  # half-close: the server cancels nothing that finished
        if stream is not None:
            stream.cancel()
        if reader is not None:
            reader.join(timeout=5)

    def _open(self) -> None:
        requests: queue.SimpleQueue[pb.SessionRequest | None] = queue.SimpleQueue()

        def outgoing() -> Iterator[pb.SessionRequest]:
            while (request := requests.get()) is not None:
                yield request

        stream = self._stub.RunDirectives(outgoing())
        self._requests, self._stream = requests, stream
        self._reader = threading.Thread(
            target=self._read, args=(stream,), name="squire-directive-session", daemon=True
        )
        self._reader.start()

    def _read(self, stream: Any) -> None:
        error: RpcError = Unavailable("the directive session stream ended", "UNAVAILABLE")
        try:
            for message in stream:
                inbox = self._calls.get(message.call_id)
                if inbox is not None:
                    inbox.put(message)
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc)
        with self._lock:
            if self._stream is stream:  # broken, not closed: the next call re-opens
                self._requests = self._stream = self._reader = None
            pending, self._calls = list(self._calls.values()), {}
        for inbox in pending:
            inbox.put(error)


class SessionRun:
    """A small directive on the client's session; behaves like DirectiveRun."""

    def __init__(self, session: DirectiveSession, plan: Plan, inputs: Sequence[Any]) -> None:
        self.plan = plan
        self.directive_id: str | None = None
        self.progress: Progress | None = None
        self.finished = False
        request = pb.SessionRequest(plan=plan_request(plan).plan, end_input=True)
        items = [encode(value, plan.serializer) for value in inputs]  # raises before sending
        if items:
            request.inputs.items.extend(items)
        self._sent = len(items)
        self._session = session
        self._call_id, self._inbox = session.start(request)
        self._pending: list[DirectiveEvent] = []

    @property
    def inputs_sent(self) -> int:
        return self._sent

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> DirectiveEvent:
        while not self._pending:
            if self.finished:
                raise StopIteration
            message = self._inbox.get()
            if isinstance(message, RpcError):
                self.finished = True
                raise message
            for raw in message.events:
                event = directive_event(raw, self.plan.serializer)
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

    def cancel(self) -> None:
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
