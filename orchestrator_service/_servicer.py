"""gRPC servicers: they translate messages into core events (through the
:class:`Hub`) and write what the hub's boxes hold. No routing decision is
made here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service import _convert as convert
from orchestrator_service._durable import Durable, Missing, write_missing
from orchestrator_service._events import (
    ChannelClosed,
    ChannelLeased,
    ChannelReleased,
    CreditChanged,
    DirectiveCancelled,
    DirectiveSubmitted,
    EndCall,
    HeartbeatReceived,
    InputEnded,
    InputsAccepted,
    ResultsArrived,
    ResultsTaken,
    TasksPublished,
    WorkerConnected,
    WorkerDisconnected,
)
from orchestrator_service._hub import CallBox, ChannelBox, Hub, WorkerLink
from orchestrator_service._items import take_bounded
from orchestrator_service._model import Code, RouterError, queue_label
from orchestrator_service._session import Session
from orchestrator_service._signal import Signal

log = logging.getLogger("squire.orchestrator")

PROGRESS_INTERVAL = 0.1


async def abort(context: grpc.aio.ServicerContext, error: RouterError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.code.value], error.message)
    raise AssertionError("unreachable")  # context.abort always raises


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    # Stream handlers write through context.write and return None, which the
    # generated stubs (typed for generator handlers) do not describe.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.WorkerMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        hub = self._hub
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await abort(
                context,
                RouterError(Code.INVALID_ARGUMENT, "the first worker message must be a hello"),
            )
        hello = convert.hello_from_pb(first.hello, context.peer())
        refused: RouterError | None = None
        if hello.worker_id in hub.workers:
            refused = RouterError(
                Code.ALREADY_EXISTS, f"a worker with id {hello.worker_id!r} is already connected"
            )
        else:
            # The link first: the core may dispatch to the worker at once.
            link = hub.workers[hello.worker_id] = WorkerLink(hello.worker_id)
            try:
                hub.handle(WorkerConnected(hello))
            except RouterError as exc:
                del hub.workers[hello.worker_id]
                refused = exc
        if refused is not None:
            log.warning("worker refused: %s", refused.message,
                        extra={"worker_id": hello.worker_id, "peer": hello.peer})
            await abort(context, refused)
        log.info(
            "worker connected",
            extra={"worker_id": link.worker_id, "capacity": hello.capacity,
                   "version": hello.version},
        )
        reader = asyncio.create_task(self._read(link, request_iterator))
        try:
            await context.write(
                pb.OrchestratorMessage(
                    welcome=pb.Welcome(
                        session_id=f"{link.worker_id}@{id(link):x}",
                        heartbeat_interval_seconds=hub.router.config.heartbeat_interval,
                    )
                )
            )
            await self._write(link, reader, context)
        finally:
            # Bookkeeping first, awaiting last: if this handler is cancelled
            # again while awaiting, the state must already be right.
            reader.cancel()
            if hub.workers.get(link.worker_id) is link:
                del hub.workers[link.worker_id]
                hub.handle(WorkerDisconnected(link.worker_id))
            log.info("worker disconnected", extra={"worker_id": link.worker_id})
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, link: WorkerLink, requests: AsyncIterator[pb.WorkerMessage]) -> None:
        hub = self._hub
        worker_id = link.worker_id
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "results":
                hub.handle(ResultsArrived(worker_id, convert.results_from_pb(msg.results)))
            elif kind == "heartbeat":
                beat = msg.heartbeat
                hub.handle(HeartbeatReceived(worker_id, beat.executing, beat.buffered))
            elif kind == "credit":
                hub.handle(CreditChanged(worker_id, msg.credit.window))
            elif kind == "hello":
                raise RouterError(Code.FAILED_PRECONDITION, "a worker sends hello only once")

    async def _write(
        self, link: WorkerLink, reader: asyncio.Task[None], context: grpc.aio.ServicerContext
    ) -> None:
        while True:
            if link.ipc:
                ipcs, link.ipc = link.ipc, []
                for ipc in ipcs:
                    await context.write(convert.ipc_to_pb(ipc))
            if link.tasks:
                tasks, link.tasks = link.tasks, []
                for message in convert.tasks_to_pb(tasks):
                    await context.write(message)
                continue  # more may have arrived while writing
            if link.closed is not None:
                log.warning("worker silent, leases re-queued", extra={"worker_id": link.worker_id})
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, link.closed)
            if reader.done():
                exc = reader.exception()
                if isinstance(exc, RouterError):
                    await abort(context, exc)
                return  # the worker closed its side
            await asyncio.wait(
                (link.signal.future(), reader), return_when=asyncio.FIRST_COMPLETED
            )


class ChannelServicer(pb_grpc.ChannelServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    async def LeaseChannel(
        self, request: pb.LeaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseChannelResponse:
        hub = self._hub
        channel_id = hub.new_id()
        hub.channels[channel_id] = ChannelBox(channel_id)
        try:
            hub.handle(ChannelLeased(channel_id))
        except RouterError as exc:
            del hub.channels[channel_id]
            await abort(context, exc)
        return pb.LeaseChannelResponse(channel_id=channel_id)

    async def Publish(
        self,
        request_iterator: AsyncIterator[pb.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PublishResponse:
        hub = self._hub
        router = hub.router
        channel_id = ""
        published = 0
        try:
            async for request in request_iterator:
                channel_id = request.channel_id or channel_id
                if not channel_id:
                    raise RouterError(
                        Code.INVALID_ARGUMENT, "the first PublishRequest must name channel_id"
                    )
                tasks = [
                    convert.spec_to_record(spec, published + i)
                    for i, spec in enumerate(request.tasks)
                ]
                while not router.can_publish(channel_id) and channel_id in hub.channels:
                    # flow control: wait for room (re-checked at least every second)
                    signal = hub.channels[channel_id].signal
                    await asyncio.wait((signal.future(),), timeout=1.0)
                hub.handle(TasksPublished(channel_id, tasks))
                published += len(tasks)
        except RouterError as exc:
            await abort(context, exc)
        return pb.PublishResponse(published=published)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultBatch]:
        hub = self._hub
        box = hub.channels.get(request.channel_id)
        if box is None or request.channel_id not in hub.router.channels:
            await abort(context, RouterError(
                Code.NOT_FOUND,
                f"unknown channel id {request.channel_id!r} (never leased or released)",
            ))
        while True:
            results = take_bounded(box.results, convert.MAX_ITEMS_PER_MESSAGE)
            if results:
                hub.handle(ResultsTaken(box.channel_id, len(results)))
                yield convert.results_to_pb(results)
                continue
            if box.ended or box.released:
                return
            await box.signal.wait()

    async def CloseChannel(
        self, request: pb.CloseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        try:
            self._hub.handle(ChannelClosed(request.channel_id))
        except RouterError as exc:
            await abort(context, exc)
        return pb.CloseChannelResponse()

    async def ReleaseChannel(
        self, request: pb.ReleaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseChannelResponse:
        try:
            self._hub.handle(ChannelReleased(request.channel_id))
        except RouterError as exc:
            await abort(context, exc)
        return pb.ReleaseChannelResponse()


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
            plan = convert.plan_from_pb(first.plan)
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
            if box.end is None and not detached and not hub.closing:
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
                await self._finish(box.end, context)
                return
            now = time.monotonic()
            if now - last_progress >= PROGRESS_INTERVAL:
                last_progress = now
                progress = hub.router.progress(box.directive_id)
                if progress is not None:
                    message = convert.progress_to_pb(progress)
                    if hub.store is not None:
                        message.received = box.accepted  # only what is journaled
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

    async def _finish(self, end: EndCall, context: grpc.aio.ServicerContext) -> None:
        self._hub.delivered(end.directive_id)
        if end.code is None:
            events = convert.EventsToWrite()
            convert.add_final_events(events.new, end)
            for event in events:
                await context.write(event)
            log.debug("directive done", extra={"routing_key": end.directive_id})
            return
        log.info("directive ended", extra={"routing_key": end.directive_id, "error": end.message})
        await abort(context, RouterError(end.code, end.message))


class StatusServicer(pb_grpc.StatusServiceServicer):
    def __init__(self, hub: Hub, state: Callable[[], str], version: str) -> None:
        self._hub = hub
        self._state = state
        self._version = version

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        return status_to_pb(self._hub, self._state(), self._version)


def status_to_pb(hub: Hub, state: str, version: str) -> pb.GetStatusResponse:
    router = hub.router
    now = router.clock()
    response = pb.GetStatusResponse(state=state, version=version)
    for w in router.workers.values():
        response.workers.append(
            pb.WorkerStatus(
                worker_id=w.id,
                operations=sorted(w.hello.operations),
                monoids=sorted(w.hello.monoids),
                capacity=w.hello.capacity,
                window=max(w.window, 0),
                in_flight=len(w.leases),
                completed=w.completed,
                connected_seconds=now - w.connected_at,
                peer=w.hello.peer,
                executing=w.executing,
                buffered=w.buffered,
                version=w.hello.version,
            )
        )
    depth = 0
    for key, q in sorted(router.queues.items()):
        if q.depth:
            response.queues.append(pb.QueueStatus(operation=queue_label(key), depth=q.depth))
            depth += q.depth
    response.queue_depth = depth
    for c in router.channels.values():
        response.channels.append(
            pb.ChannelStatus(
                channel_id=c.id,
                sender_closed=c.sender_closed,
                published=c.published,
                completed=c.completed,
                queued=c.queued,
                in_flight=c.leased,
                directive=c.directive,
            )
        )
    for d in router.directives.values():
        progress = router.progress(d.id)
        assert progress is not None
        response.directives.append(
            pb.DirectiveStatus(
                directive_id=d.id,
                plan=d.plan.describe(),
                progress=convert.progress_to_pb(progress),
                age_seconds=now - d.started_at,
            )
        )
    return response
