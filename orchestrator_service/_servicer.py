"""gRPC servicers: they translate messages into Router events and Router
outputs into stream writes. No routing decision is made here."""

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
from orchestrator_service._core import Router, Worker
from orchestrator_service._directive import Directive, DirectiveState
from orchestrator_service._model import Code, RouterError, queue_label
from orchestrator_service._session import Session
from orchestrator_service._signal import Signal

log = logging.getLogger("squire.orchestrator")

PROGRESS_INTERVAL = 0.1


async def abort(context: grpc.aio.ServicerContext, error: RouterError) -> NoReturn:
    await context.abort(grpc.StatusCode[error.code.value], error.message)
    raise AssertionError("unreachable")  # context.abort always raises


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    # Stream handlers write through context.write and return None, which the
    # generated stubs (typed for generator handlers) do not describe.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.WorkerMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        router = self._router
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await abort(
                context,
                RouterError(Code.INVALID_ARGUMENT, "the first worker message must be a hello"),
            )
        try:
            worker = router.connect_worker(convert.hello_from_pb(first.hello, context.peer()))
        except RouterError as exc:
            await abort(context, exc)
        signal = Signal()
        worker.notify = signal
        log.info(
            "worker connected",
            extra={"worker_id": worker.id, "capacity": worker.hello.capacity},
        )
        reader = asyncio.create_task(self._read(worker, request_iterator))
        try:
            await context.write(
                pb.OrchestratorMessage(
                    welcome=pb.Welcome(
                        session_id=f"{worker.id}@{id(worker):x}",
                        heartbeat_interval_seconds=router.config.heartbeat_interval,
                        lease_timeout_seconds=router.config.lease_timeout,
                    )
                )
            )
            await self._write(worker, signal, reader, context)
        finally:
            # Bookkeeping first, awaiting last: if this handler is cancelled
            # again while awaiting, the state must already be right.
            reader.cancel()
            router.disconnect_worker(worker)
            log.info("worker disconnected", extra={"worker_id": worker.id})
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, worker: Worker, requests: AsyncIterator[pb.WorkerMessage]) -> None:
        router = self._router
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "results":
                router.on_results(worker, *convert.results_from_pb(msg.results))
            elif kind == "heartbeat":
                router.heartbeat(worker)
            elif kind == "credit":
                router.set_window(worker, msg.credit.window)
            elif kind == "hello":
                raise RouterError(Code.FAILED_PRECONDITION, "a worker sends hello only once")

    async def _write(
        self,
        worker: Worker,
        signal: Signal,
        reader: asyncio.Task[None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        while True:
            if worker.ipc:
                ipcs, worker.ipc = worker.ipc, []
                for ipc in ipcs:
                    await context.write(convert.ipc_to_pb(ipc))
            if worker.outbox:
                tasks, worker.outbox = worker.outbox, []
                for message in convert.tasks_to_pb(tasks):
                    await context.write(message)
                continue  # more may have arrived while writing
            if worker.lost:
                timeout = self._router.config.lease_timeout
                log.warning("worker silent, leases re-queued", extra={"worker_id": worker.id})
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no heartbeat within {timeout:g} s; this worker's tasks were re-queued",
                )
            if reader.done():
                exc = reader.exception()
                if isinstance(exc, RouterError):
                    await abort(context, exc)
                return  # the worker closed its side
            await asyncio.wait((signal.future(), reader), return_when=asyncio.FIRST_COMPLETED)


class ChannelServicer(pb_grpc.ChannelServiceServicer):
    def __init__(self, router: Router) -> None:
        self._router = router

    def _signal(self, channel_id: str) -> Signal:
        channel = self._router.channel(channel_id)
        if channel.notify is None:
            channel.notify = Signal()
        assert isinstance(channel.notify, Signal)
        return channel.notify

    async def LeaseChannel(
        self, request: pb.LeaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseChannelResponse:
        try:
            channel = self._router.lease_channel()
        except RouterError as exc:
            await abort(context, exc)
        return pb.LeaseChannelResponse(channel_id=channel.id)

    async def Publish(
        self,
        request_iterator: AsyncIterator[pb.PublishRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.PublishResponse:
        router = self._router
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
                channel = router.channel(channel_id)
                signal = self._signal(channel_id)
                while not router.can_publish(channel):
                    # flow control: wait for room (re-checked at least every second)
                    await asyncio.wait((signal.future(),), timeout=1.0)
                    channel = router.channel(channel_id)
                router.publish(channel_id, tasks)
                published += len(tasks)
        except RouterError as exc:
            await abort(context, exc)
        return pb.PublishResponse(published=published)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultBatch]:
        router = self._router
        try:
            signal = self._signal(request.channel_id)
            channel = router.channel(request.channel_id)
        except RouterError as exc:
            await abort(context, exc)
        while True:
            results = router.take_results(channel, convert.MAX_ITEMS_PER_MESSAGE)
            if results:
                yield convert.results_to_pb(results)
                continue
            if channel.drained or router.channels.get(channel.id) is not channel:
                return
            await signal.wait()

    async def CloseChannel(
        self, request: pb.CloseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        try:
            self._router.close_channel(request.channel_id)
        except RouterError as exc:
            await abort(context, exc)
        return pb.CloseChannelResponse()

    async def ReleaseChannel(
        self, request: pb.ReleaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseChannelResponse:
        try:
            self._router.release_channel(request.channel_id)
        except RouterError as exc:
            await abort(context, exc)
        return pb.ReleaseChannelResponse()


class DirectiveServicer(pb_grpc.DirectiveServiceServicer):
    def __init__(
        self, router: Router, on_end: Callable[[str, float], None] | None = None
    ) -> None:
        self._router = router
        self._on_end = on_end

    async def RunDirective(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.DirectiveRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        router = self._router
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        try:
            if first is None or not first.HasField("plan"):
                raise RouterError(
                    Code.INVALID_ARGUMENT, "the first DirectiveRequest must carry the plan"
                )
            directive = router.start_directive(convert.plan_from_pb(first.plan))
        except RouterError as exc:
            await abort(context, exc)
        signal = Signal()
        directive.notify = signal
        log.debug(
            "directive started",
            extra={"routing_key": directive.id, "plan": directive.plan.describe()},
        )
        reader = asyncio.create_task(self._read_inputs(directive, requests, signal))
        try:
            await context.write(
                pb.DirectiveEvent(started=pb.DirectiveStarted(directive_id=directive.id))
            )
            await self._write_events(directive, signal, reader, context)
        finally:
            # Bookkeeping before the first await: gRPC may cancel this handler
            # task again while it awaits (a client cancel racing a blocked
            # write), and the directive must not outlive its call.
            reader.cancel()
            if not directive.finished or directive.state is DirectiveState.CANCELLED:
                # The client cancelled, disconnected, or its deadline passed.
                router.cancel_directive(directive)
                log.info("directive cancelled", extra={"routing_key": directive.id})
            if self._on_end is not None:
                self._on_end(directive.state.value, router.clock() - directive.started_at)
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_inputs(
        self,
        directive: Directive,
        requests: AsyncIterator[pb.DirectiveRequest],
        signal: Signal,
    ) -> None:
        router = self._router
        while True:
            while not directive.wants_input():
                if directive.finished:
                    return
                await signal.wait()
            request = await anext(requests, None)
            if request is None:
                router.directive_input_end(directive)
                return
            if not request.HasField("inputs"):
                raise RouterError(
                    Code.INVALID_ARGUMENT, "only the first DirectiveRequest may carry a plan"
                )
            router.directive_inputs(directive, list(request.inputs.items))

    async def _write_events(
        self,
        directive: Directive,
        signal: Signal,
        reader: asyncio.Task[None],
        context: grpc.aio.ServicerContext,
    ) -> None:
        last_progress = time.monotonic()
        while True:
            items = directive.take_items()
            events = convert.EventsToWrite()
            convert.add_items(events.new, items)
            for event in events:
                await context.write(event)
            if items:
                signal()  # room in the window: let the input reader go on
            if reader.done() and not reader.cancelled():
                exc = reader.exception()
                if isinstance(exc, RouterError):
                    self._router.cancel_directive(directive)
                    await abort(context, exc)
                elif exc is not None:
                    raise exc
            if directive.finished and not directive.items:
                await self._finish(directive, context)
                return
            now = time.monotonic()
            if now - last_progress >= PROGRESS_INTERVAL:
                last_progress = now
                progress = convert.progress_to_pb(directive.progress())
                await context.write(pb.DirectiveEvent(progress=progress))
            if not directive.items and not directive.finished:
                waits: list[asyncio.Future[None]] = [signal.future()]
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
        session = Session(self._router, self._on_end)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            await session.write(context, reader)
        finally:
            reader.cancel()
            session.cancel_all()  # before awaiting: see RunDirective
            await asyncio.gather(reader, return_exceptions=True)

    async def _finish(self, directive: Directive, context: grpc.aio.ServicerContext) -> None:
        end = directive.end_status()
        if end is None:
            events = convert.EventsToWrite()
            convert.add_final_events(events.new, directive)
            for event in events:
                await context.write(event)
            log.debug("directive done", extra={"routing_key": directive.id})
            return
        log.info("directive ended", extra={"routing_key": directive.id, "error": end[1]})
        await abort(context, RouterError(*end))


class StatusServicer(pb_grpc.StatusServiceServicer):
    def __init__(self, router: Router, state: Callable[[], str], version: str) -> None:
        self._router = router
        self._state = state
        self._version = version

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        return status_to_pb(self._router, self._state(), self._version)


def status_to_pb(router: Router, state: str, version: str) -> pb.GetStatusResponse:
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
                in_flight=c.in_flight,
                directive=c.directive is not None,
            )
        )
        if c.directive is not None:
            d = c.directive
            response.directives.append(
                pb.DirectiveStatus(
                    directive_id=d.id,
                    plan=d.plan.describe(),
                    progress=convert.progress_to_pb(d.progress()),
                    age_seconds=now - d.started_at,
                )
            )
    return response
