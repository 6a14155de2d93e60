"""gRPC servicers: they translate messages into core events (through the
:class:`Hub`) and write what the hub's boxes hold. No routing decision is
made here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service import _convert as convert
from orchestrator_service._events import (
    CreditChanged,
    HeartbeatReceived,
    ResultsArrived,
    WorkerConnected,
    WorkerDisconnected,
)
from orchestrator_service._hub import Hub, WorkerLink
from orchestrator_service._model import Code, RouterError, queue_label
from orchestrator_service._tenants import caller

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
    who = caller()  # a tenant sees its own channels and directives; an operator all
    for c in router.channels.values():
        if not who.may_see(c.tenant):
            continue
        response.channels.append(
            pb.ChannelStatus(
                channel_id=c.id,
                sender_closed=c.sender_closed,
                published=c.published,
                completed=c.completed,
                queued=c.queued,
                in_flight=c.leased,
                directive=c.directive,
                tenant=c.tenant,
            )
        )
    for d in router.directives.values():
        if not who.may_see(d.plan.tenant):
            continue
        progress = router.progress(d.id)
        assert progress is not None
        response.directives.append(
            pb.DirectiveStatus(
                directive_id=d.id,
                plan=d.plan.describe(),
                progress=convert.progress_to_pb(progress),
                age_seconds=now - d.started_at,
                tenant=d.plan.tenant,
            )
        )
    return response
