"""DirectiveService: RunDirective (a directive per call, or attached to one
by id), RunDirectives (many over one stream, see ``_session``), and the
durable directives' ListDirectives and CancelDirective (see ``_durable``).
Events go to the core through the :class:`Hub`; no routing decision is made
here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service import _convert as convert
from orchestrator_service._durable import Durable, Missing, check_journal, write_missing
from orchestrator_service._events import (
    DirectiveCancelled,
    DirectiveSubmitted,
    EndCall,
    InputEnded,
    InputsAccepted,
)
from orchestrator_service._hub import CallBox, Hub
from orchestrator_service._model import Code, RouterError
from orchestrator_service._servicer import PROGRESS_INTERVAL, abort
from orchestrator_service._session import Session
from orchestrator_service._signal import Signal
from orchestrator_service._tenants import owned

log = logging.getLogger("squire.orchestrator")


class DirectiveServicer(pb_grpc.DirectiveServiceServicer):
    def __init__(self, hub: Hub, durable: Durable) -> None:
        self._hub = hub
        self._durable = durable

    async def RunDirective(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.DirectiveRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        hub = self._hub
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is not None and first.HasField("attach"):
            await self._attach(first.attach, requests, context)
            return
        directive_id = hub.new_id()
        box = CallBox(directive_id, Signal())
        try:
            if first is None or not first.HasField("plan"):
                raise RouterError(
                    Code.INVALID_ARGUMENT, "the first DirectiveRequest must carry the plan"
                )
            plan = owned(convert.plan_from_pb(first.plan))
            check_journal(hub, plan)
            box.detached_submit = plan.detached
            hub.calls[directive_id] = box
            hub.handle(DirectiveSubmitted(directive_id, plan))
        except RouterError as exc:
            hub.calls.pop(directive_id, None)
            await abort(context, exc)
        log.debug("directive started", extra={"routing_key": directive_id, "plan": plan.describe()})
        started = pb.DirectiveStarted(directive_id=directive_id)
        await self._serve(box, started, None, requests, context, detached=plan.detached)

    async def _attach(
        self,
        attach: pb.AttachDirective,
        requests: AsyncIterator[pb.DirectiveRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        try:
            box, started, missing = self._durable.open_attach(attach)
        except RouterError as exc:
            await abort(context, exc)
        key = box.directive_id
        directive = self._hub.router.directives.get(key)
        detached = directive.plan.detached if directive is not None else True
        log.info("caller attached", extra={"routing_key": key})
        await self._serve(box, started, missing, requests, context, detached=detached)

    async def _serve(
        self,
        box: CallBox,
        started: pb.DirectiveStarted,
        missing: Missing | None,
        requests: AsyncIterator[pb.DirectiveRequest],
        context: grpc.aio.ServicerContext,
        *,
        detached: bool,
    ) -> None:
        hub = self._hub
        directive_id = box.directive_id
        reader = asyncio.create_task(self._read_inputs(box, requests))
        try:
            while hub.store is not None and not box.journaled and not started.attached:
                await box.signal.wait()  # accepted means journaled: started waits for it
            await context.write(pb.DirectiveEvent(started=started))
            if missing is not None:
                await write_missing(self._durable, box, missing, context)
            await self._write_events(box, reader, context)
        finally:
            # Bookkeeping before the first await: gRPC may cancel this handler
            # task again while it awaits (a client cancel racing a blocked
            # write), and the directive must not outlive its call.
            reader.cancel()
            if box.end is None and not detached and not hub.closing and not box.displaced:
                # The client cancelled, disconnected, or its deadline passed.
                hub.handle(DirectiveCancelled(directive_id))
                hub.forget(directive_id)
                log.info("directive cancelled", extra={"routing_key": directive_id})
            if hub.calls.get(directive_id) is box:
                del hub.calls[directive_id]
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_inputs(
        self, box: CallBox, requests: AsyncIterator[pb.DirectiveRequest]
    ) -> None:
        hub = self._hub
        window = hub.router.config.directive_window
        while True:
            # Backpressure: at most `window` elements in the pipeline (the
            # core's credit) and as many results not yet written.
            while box.credit <= 0 or len(box.items) >= window:
                if box.end is not None:
                    return
                await box.signal.wait()
            request = await anext(requests, None)
            if request is None:
                hub.handle(InputEnded(box.directive_id))
                return
            if not request.HasField("inputs"):
                raise RouterError(
                    Code.INVALID_ARGUMENT, "only the first DirectiveRequest may carry a plan"
                )
            items = list(request.inputs.items)
            box.credit -= len(items)
            hub.handle(InputsAccepted(box.directive_id, items))

    async def ListDirectives(
        self, request: pb.ListDirectivesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDirectivesResponse:
        return self._durable.list_directives()

    async def CancelDirective(
        self, request: pb.CancelDirectiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelDirectiveResponse:
        try:
            self._durable.cancel(request.directive_id)
        except RouterError as exc:
            await abort(context, exc)
        return pb.CancelDirectiveResponse()

    async def _write_events(
        self, box: CallBox, reader: asyncio.Task[None], context: grpc.aio.ServicerContext
    ) -> None:
        last_progress = time.monotonic()
        hub = self._hub
        while True:
            if hub.closing is not None:
                await abort(context, RouterError(Code.UNAVAILABLE, hub.closing))
            if box.displaced is not None:
                await abort(context, RouterError(Code.ABORTED, box.displaced))
            items = box.items.take()
            events = convert.EventsToWrite()
            convert.add_items(events.new, items)
            for event in events:
                await context.write(event)
            if items:
                box.signal()  # room in the window: let the input reader go on
            if reader.done() and not reader.cancelled():
                exc = reader.exception()
                if isinstance(exc, RouterError):
                    hub.handle(DirectiveCancelled(box.directive_id))
                    await abort(context, exc)
                elif exc is not None:
                    raise exc
            if box.end is not None and not box.items:
                await self._finish(box, box.end, context)
                return
            now = time.monotonic()
            if now - last_progress >= PROGRESS_INTERVAL:
                last_progress = now
                progress = hub.router.progress(box.directive_id)
                if progress is not None:
                    message = convert.progress_to_pb(progress)
                    if hub.store is not None:
                        # Only what is journaled: a caller may leave once
                        # received equals total (input ended and all kept).
                        message.received = box.accepted
                        plan = hub.plans.get(box.directive_id)
                        if box.input_journaled:
                            message.total = box.accepted
                        elif plan is not None:
                            message.total = plan.expected_items
                    await context.write(pb.DirectiveEvent(progress=message))
            if not box.items and box.end is None:
                waits: list[asyncio.Future[None]] = [box.signal.future()]
                if not reader.done():
                    waits.append(reader)
                await asyncio.wait(
                    waits, timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED
                )

    async def RunDirectives(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        session = Session(self._hub)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            await session.write(context, reader)
        finally:
            reader.cancel()
            session.cancel_all()  # before awaiting: see RunDirective
            await asyncio.gather(reader, return_exceptions=True)

    async def _finish(
        self, box: CallBox, end: EndCall, context: grpc.aio.ServicerContext
    ) -> None:
        self._hub.delivered(box)
        if end.code is None:
            events = convert.EventsToWrite()
            convert.add_final_events(events.new, end)
            for event in events:
                await context.write(event)
            log.debug("directive done", extra={"routing_key": end.directive_id})
            return
        log.info("directive ended", extra={"routing_key": end.directive_id, "error": end.message})
        await abort(context, RouterError(end.code, end.message))
