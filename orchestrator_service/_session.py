"""RunDirectives: many directives multiplexed over one stream.

Each call is an ordinary Directive in the Router; only the transport differs
from RunDirective. The reader turns SessionRequests into Router events; the
writer sends, per call with news, one SessionEvent holding its events in
order (``started`` rides with the first batch) and, on the last one, the
CallEnd that RunDirective would have sent as the gRPC status.

Flow control is per session: the reader stops reading while the session's
calls hold ``directive_window`` elements in their pipelines, and resumes as
they complete; a client that stops reading events stops the session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service import _convert as convert
from orchestrator_service._core import Router
from orchestrator_service._directive import Directive
from orchestrator_service._interceptor import DirectiveSlot, acquire_directive_slot
from orchestrator_service._model import Code, RouterError
from orchestrator_service._signal import Signal

PROGRESS_INTERVAL = 0.1


def _code_number(code: Code) -> int:
    return int(grpc.StatusCode[code.value].value[0])


@dataclass(eq=False)
class _Call:
    call_id: int
    directive: Directive
    slot: DirectiveSlot  # counts against --max-directives(-per-client)
    started_sent: bool = False
    last_progress: float = field(default_factory=time.monotonic)


class Session:
    def __init__(self, router: Router, on_end: Callable[[str, float], None] | None) -> None:
        self._router = router
        self._on_end = on_end
        self._calls: dict[int, _Call] = {}
        self._refused: list[pb.SessionEvent] = []  # calls that never started
        self._signal = Signal()

    # --------------------------------------------------------------- reading

    def _in_pipeline(self) -> int:
        return sum(c.directive.received - c.directive.completed for c in self._calls.values())

    async def read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        window = self._router.config.directive_window
        async for request in requests:
            while self._in_pipeline() >= window:
                await self._signal.wait()
            try:
                self._handle(request)
            except RouterError as exc:
                refused = self._calls.pop(request.call_id, None)
                if refused is not None:
                    refused.slot.release()
                self._refuse(request.call_id, exc.code, exc.message)
                self._signal()  # the writer sends the refusal

    def _handle(self, request: pb.SessionRequest) -> None:
        router = self._router
        call = self._calls.get(request.call_id)
        if request.cancel:
            if call is not None:
                router.cancel_directive(call.directive)
            return
        if call is None:
            if not request.HasField("plan"):
                raise RouterError(
                    Code.INVALID_ARGUMENT,
                    f"call {request.call_id}: its first request must carry the plan",
                )
            slot = acquire_directive_slot()  # RESOURCE_EXHAUSTED past a limit
            try:
                directive = router.start_directive(convert.plan_from_pb(request.plan))
            except BaseException:
                slot.release()
                raise
            directive.notify = self._signal
            call = self._calls[request.call_id] = _Call(request.call_id, directive, slot)
        elif request.HasField("plan"):
            raise RouterError(
                Code.INVALID_ARGUMENT, f"call {request.call_id}: the plan was already given"
            )
        directive = call.directive
        if request.HasField("inputs"):
            if directive.input_closed:
                router.cancel_directive(directive)
                raise RouterError(
                    Code.INVALID_ARGUMENT, f"call {request.call_id}: inputs after end_input"
                )
            router.directive_inputs(directive, list(request.inputs.items))
        if request.end_input and not directive.input_closed:
            router.directive_input_end(directive)

    def _refuse(self, call_id: int, code: Code, message: str) -> None:
        self._refused.append(
            pb.SessionEvent(
                call_id=call_id, end=pb.CallEnd(code=_code_number(code), message=message)
            )
        )

    # --------------------------------------------------------------- writing

    async def write(
        self, context: grpc.aio.ServicerContext, reader: asyncio.Task[None]
    ) -> None:
        while True:
            wrote = False
            while self._refused:
                await context.write(self._refused.pop(0))
                wrote = True
            now = time.monotonic()
            for call in list(self._calls.values()):
                message = self._news(call, now)
                if message is not None:
                    await context.write(message)
                    wrote = True
            if reader.done():
                exc = reader.exception() if not reader.cancelled() else None
                if exc is not None:
                    raise exc
                if not self._calls and not self._refused:
                    return
            if not wrote:
                waits: list[asyncio.Future[None]] = [self._signal.future()]
                if not reader.done():
                    waits.append(reader)
                await asyncio.wait(
                    waits, timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                )

    def _news(self, call: _Call, now: float) -> pb.SessionEvent | None:
        d = call.directive
        items = d.take_items()
        finished = d.finished and not d.items
        due = now - call.last_progress >= PROGRESS_INTERVAL
        if not call.started_sent and not (items or finished or due):
            # A small directive is often done before anything else is worth
            # a message: its started event goes out with its results and end
            # (one message per call, not two), or on the progress clock.
            return None
        message = pb.SessionEvent(call_id=call.call_id)
        events = message.events
        if not call.started_sent:
            call.started_sent = True
            events.add().started.directive_id = d.id
        convert.add_items(events.add, items)  # in place: no copy per event
        if items:
            self._signal()  # room in the window for the reader
        if not finished and due:
            call.last_progress = now
            convert.fill_progress(events.add().progress, d.progress())
        if finished:
            del self._calls[call.call_id]
            call.slot.release()
            end = d.end_status()
            if end is None:
                convert.add_final_events(events.add, d)
                message.end.code = 0
            else:
                message.end.code = _code_number(end[0])
                message.end.message = end[1]
            if self._on_end is not None:
                self._on_end(d.state.value, self._router.clock() - d.started_at)
        return message if events or message.HasField("end") else None

    def cancel_all(self) -> None:
        """The session ended: cancel whatever it still runs."""
        for call in self._calls.values():
            self._router.cancel_directive(call.directive)
            call.slot.release()
        self._calls.clear()
