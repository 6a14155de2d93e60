"""RunDirectives: many directives multiplexed over one stream.

Each call is an ordinary directive in the core; only the transport differs
from RunDirective. The reader turns SessionRequests into Router events; the
writer sends, per call with news, one SessionEvent holding its events in
order (``started`` rides with the first batch, or goes out as soon as the
directive is journaled) and, on the last one, the
CallEnd that RunDirective would have sent as the gRPC status.

Flow control is per session: the reader stops reading while the session's
calls hold ``directive_window`` elements in their pipelines, and resumes as
they complete; a client that stops reading events stops the session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service import _convert as convert
from orchestrator_service._durable import check_journal
from orchestrator_service._events import (
    DirectiveCancelled,
    DirectiveSubmitted,
    InputEnded,
    InputsAccepted,
)
from orchestrator_service._hub import CallBox, Hub
from orchestrator_service._interceptor import DirectiveSlot, acquire_directive_slot
from orchestrator_service._model import Code, RouterError
from orchestrator_service._signal import Signal
from orchestrator_service._tenants import owned

PROGRESS_INTERVAL = 0.1


def _code_number(code: Code) -> int:
    return int(grpc.StatusCode[code.value].value[0])


@dataclass(eq=False)
class _Call:
    call_id: int
    box: CallBox
    slot: DirectiveSlot  # counts against --max-directives(-per-client)
    input_closed: bool = False
    started_sent: bool = False
    last_progress: float = field(default_factory=time.monotonic)


class Session:
    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._window = hub.router.config.directive_window
        self._calls: dict[int, _Call] = {}
        self._refused: list[pb.SessionEvent] = []  # calls that never started
        self._signal = Signal()

    # --------------------------------------------------------------- reading

    def _in_pipeline(self) -> int:
        # A call's credit is its window less what it holds in its pipeline.
        return sum(self._window - c.box.credit for c in self._calls.values())

    async def read(self, requests: AsyncIterator[pb.SessionRequest]) -> None:
        async for request in requests:
            while self._in_pipeline() >= self._window:
                await self._signal.wait()
            try:
                self._handle(request)
            except RouterError as exc:
                refused = self._calls.pop(request.call_id, None)
                if refused is not None:
                    refused.slot.release()
                    self._hub.calls.pop(refused.box.directive_id, None)
                self._refuse(request.call_id, exc.code, exc.message)
                self._signal()  # the writer sends the refusal

    def _handle(self, request: pb.SessionRequest) -> None:
        hub = self._hub
        call = self._calls.get(request.call_id)
        if request.cancel:
            if call is not None:
                hub.handle(DirectiveCancelled(call.box.directive_id))
            return
        if call is None:
            if not request.HasField("plan"):
                raise RouterError(
                    Code.INVALID_ARGUMENT,
                    f"call {request.call_id}: its first request must carry the plan",
                )
            plan = owned(convert.plan_from_pb(request.plan))
            check_journal(hub, plan)
            slot = acquire_directive_slot()  # RESOURCE_EXHAUSTED past a limit
            directive_id = hub.new_id()
            box = hub.calls[directive_id] = CallBox(
                directive_id, self._signal, detached_submit=plan.detached
            )
            call = self._calls[request.call_id] = _Call(request.call_id, box, slot)
            hub.handle(DirectiveSubmitted(directive_id, plan))
        elif request.HasField("plan"):
            raise RouterError(
                Code.INVALID_ARGUMENT, f"call {request.call_id}: the plan was already given"
            )
        directive_id = call.box.directive_id
        if request.HasField("inputs"):
            if call.input_closed:
                hub.handle(DirectiveCancelled(directive_id))
                raise RouterError(
                    Code.INVALID_ARGUMENT, f"call {request.call_id}: inputs after end_input"
                )
            items = list(request.inputs.items)
            call.box.credit -= len(items)
            hub.handle(InputsAccepted(directive_id, items))
        if request.end_input and not call.input_closed:
            call.input_closed = True
            hub.handle(InputEnded(directive_id))

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
            if self._hub.closing is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self._hub.closing)
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
        box = call.box
        if box.displaced is not None:  # another caller attached (see Durable.attach)
            del self._calls[call.call_id]
            call.slot.release()
            return pb.SessionEvent(
                call_id=call.call_id,
                end=pb.CallEnd(code=_code_number(Code.ABORTED), message=box.displaced),
            )
        items = box.items.take()
        end = box.end if not box.items else None
        due = now - call.last_progress >= PROGRESS_INTERVAL
        if not call.started_sent and self._hub.store is not None and not box.journaled:
            return None  # accepted means journaled: nothing goes out before the plan is
        if not call.started_sent and not (items or end or due) and self._hub.store is None:
            # A small directive is often done before anything else is worth
            # a message: its started event goes out with its results and end
            # (one message per call, not two), or on the progress clock.
            # Not when it is journaled: with its id, the caller can reattach
            # if the orchestrator dies while its (expensive) tasks run.
            return None
        message = pb.SessionEvent(call_id=call.call_id)
        events = message.events
        if not call.started_sent:
            call.started_sent = True
            events.add().started.directive_id = box.directive_id
        convert.add_items(events.add, items)  # in place: no copy per event
        if items:
            self._signal()  # room in the window for the reader
        if end is None and due:
            call.last_progress = now
            progress = self._hub.router.progress(box.directive_id)
            if progress is not None:
                convert.fill_progress(events.add().progress, progress)
        if end is not None:
            del self._calls[call.call_id]
            if self._hub.calls.get(box.directive_id) is box:
                del self._hub.calls[box.directive_id]
            self._hub.delivered(box)
            call.slot.release()
            if end.code is None:
                convert.add_final_events(events.add, end)
                message.end.code = 0
            else:
                message.end.code = _code_number(end.code)
                message.end.message = end.message
        return message if events or message.HasField("end") else None

    def cancel_all(self) -> None:
        """The session ended: cancel whatever it still runs."""
        hub = self._hub
        for call in self._calls.values():
            key = call.box.directive_id
            plan = hub.plans.get(key)
            if hub.calls.get(key) is not call.box:
                call.slot.release()  # displaced by another caller: it runs on for that one
                continue
            if call.box.end is None and hub.closing is None and not (plan and plan.detached):
                hub.handle(DirectiveCancelled(key))
                hub.forget(key)
            del hub.calls[key]
            call.slot.release()
        self._calls.clear()
