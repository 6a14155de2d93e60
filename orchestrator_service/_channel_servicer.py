"""The leased-channel API on the wire (``ChannelService``).

With a journal every call answers only once what it changed is committed:
the lease, the published tasks (``PublishResponse``), the close, the
release; results reach the subscriber only once committed (the hub holds
them). That makes a channel survive an orchestrator restart on the same
store: a publisher whose call broke sends its unacknowledged tasks again
(the core leaves out ids the channel has), and a subscriber resubscribes
with how many results it has, and gets the rest in the channel's result
order, those a broken stream may have lost read back from the journal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service import _convert as convert
from orchestrator_service._events import (
    ChannelClosed,
    ChannelLeased,
    ChannelReleased,
    ResultsTaken,
    TasksPublished,
)
from orchestrator_service._hub import ChannelBox, Hub
from orchestrator_service._items import take_bounded
from orchestrator_service._journal_records import ENTRY_RECORDS, decode_records
from orchestrator_service._model import ChannelResult, Code, RouterError
from orchestrator_service._restore import replay_channel
from orchestrator_service._servicer import abort
from orchestrator_service._tenants import caller

SUBSCRIBED = "squire-subscribed"  # initial metadata of an accepted Subscribe


def check_writable(hub: Hub, what: str) -> None:
    """Refuse new work while the journal's commits fail (disk full:
    RESOURCE_EXHAUSTED; read-only or unreachable: UNAVAILABLE), or while the
    orchestrator stops (UNAVAILABLE: the caller retries at the next one)."""
    if hub.closing is not None:
        raise RouterError(Code.UNAVAILABLE, hub.closing)
    failure = hub.store.failure if hub.store is not None else None
    if failure is not None:
        raise RouterError(
            Code(failure.code) if failure.code in Code.__members__ else Code.UNAVAILABLE,
            f"{what} is refused while the journal cannot be written: {failure.message}",
        )


async def committed(hub: Hub) -> None:
    try:
        await hub.committed()
    except Exception as exc:  # the store gave up (it is closing)
        raise RouterError(Code.UNAVAILABLE, f"the journal did not commit: {exc}") from exc


async def delivered_results(
    hub: Hub, channel_id: str, start: int, stop: int
) -> list[ChannelResult]:
    """Results ``[start, stop)`` of a journaled channel, in delivery order."""
    assert hub.store is not None
    stream = await hub.store.read(channel_id)
    if stream is None:
        raise RouterError(Code.NOT_FOUND, f"channel {channel_id!r} is not in the journal")
    records = [
        record
        for kind, payload in stream.entries
        if kind == ENTRY_RECORDS
        for record in decode_records(payload)
    ]
    _, results = await asyncio.to_thread(replay_channel, channel_id, records, keep_results=True)
    return results[start:stop]


class ChannelServicer(pb_grpc.ChannelServiceServicer):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def _box(self, channel_id: str) -> ChannelBox:
        box = self._hub.channels.get(channel_id)
        if (
            box is None or channel_id not in self._hub.router.channels
            or not caller().may_see(box.tenant)  # another tenant's: as unknown
        ):
            raise RouterError(
                Code.NOT_FOUND, f"unknown channel id {channel_id!r} (never leased or released)"
            )
        box.used = True
        return box

    async def LeaseChannel(
        self, request: pb.LeaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseChannelResponse:
        hub = self._hub
        channel_id = hub.new_id()
        try:
            check_writable(hub, "leasing a channel")
            tenant = caller().tenant
            hub.channels[channel_id] = ChannelBox(channel_id, tenant=tenant)
            try:
                hub.handle(ChannelLeased(channel_id, tenant))
            except RouterError:
                del hub.channels[channel_id]
                raise
            await committed(hub)
        except RouterError as exc:
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
        received = 0  # tasks in this call's requests
        added = 0  # of them, new to the channel
        try:
            async for request in request_iterator:
                channel_id = request.channel_id or channel_id
                if not channel_id:
                    raise RouterError(
                        Code.INVALID_ARGUMENT, "the first PublishRequest must name channel_id"
                    )
                tasks = [
                    convert.spec_to_record(spec, received + i)
                    for i, spec in enumerate(request.tasks)
                ]
                self._box(channel_id)
                while not router.can_publish(channel_id) and channel_id in hub.channels:
                    # flow control: wait for room (re-checked at least every second)
                    signal = hub.channels[channel_id].signal
                    await asyncio.wait((signal.future(),), timeout=1.0)
                    if hub.closing is not None:
                        break
                check_writable(hub, "publishing")
                channel = router.channels.get(channel_id)
                before = channel.published if channel is not None else 0
                hub.handle(TasksPublished(channel_id, tasks))
                received += len(tasks)
                added += router.channels[channel_id].published - before
            await committed(hub)
        except RouterError as exc:
            await abort(context, exc)
        return pb.PublishResponse(published=added, duplicates=received - added)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ResultBatch]:
        hub = self._hub
        channel_id = request.channel_id
        me = object()
        try:
            box = self._box(channel_id)
            previous, box.subscriber = box.subscriber, me
            if previous is not None:
                box.signal()  # it sees it is displaced and ends
            # Headers at once: the subscriber knows it is subscribed (and
            # that an outage it waited out is over) before any result.
            await context.send_initial_metadata(((SUBSCRIBED, "1"),))
            if request.HasField("received"):
                missing = await self._resume(box, request.received)
                for start in range(0, len(missing), convert.MAX_ITEMS_PER_MESSAGE):
                    yield convert.results_to_pb(
                        missing[start : start + convert.MAX_ITEMS_PER_MESSAGE]
                    )
            while True:
                if box.subscriber is not me:
                    raise RouterError(
                        Code.ABORTED,
                        f"another Subscribe call took over channel {channel_id!r}",
                    )
                results = take_bounded(box.results, convert.MAX_ITEMS_PER_MESSAGE)
                if results:
                    box.taken += len(results)
                    hub.handle(ResultsTaken(box.channel_id, len(results)))
                    yield convert.results_to_pb(results)
                    continue
                if box.ended or box.released:
                    return
                if hub.closing is not None:
                    raise RouterError(Code.UNAVAILABLE, hub.closing)
                await box.signal.wait()
        except RouterError as exc:
            await abort(context, exc)
        finally:
            box_now = hub.channels.get(channel_id)
            if box_now is not None and box_now.subscriber is me:
                box_now.subscriber = None

    async def _resume(self, box: ChannelBox, received: int) -> list[ChannelResult]:
        """Line the box up with a subscriber that has ``received`` results:
        the ones it lacks that were taken already (read from the journal)."""
        hub = self._hub
        total = box.taken + len(box.results)
        if received > total:
            raise RouterError(
                Code.INVALID_ARGUMENT,
                f"channel {box.channel_id!r} has delivered {total} results; "
                f"the subscriber claims {received}",
            )
        if received >= box.taken:
            skip = received - box.taken
            for _ in range(skip):
                box.results.popleft()
            if skip:
                box.taken += skip
                hub.handle(ResultsTaken(box.channel_id, skip))
            return []
        if hub.store is None:
            raise RouterError(
                Code.FAILED_PRECONDITION,
                f"channel {box.channel_id!r}: results {received} to {box.taken} were sent "
                "already and are not kept without a journal (this orchestrator runs with "
                "--store memory:)",
            )
        # The previous subscriber takes nothing more (it sees it is
        # displaced before it takes again), so ``taken`` holds still here.
        return await delivered_results(hub, box.channel_id, received, box.taken)

    async def CloseChannel(
        self, request: pb.CloseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        try:
            self._box(request.channel_id)
            self._hub.handle(ChannelClosed(request.channel_id))
            await committed(self._hub)
        except RouterError as exc:
            await abort(context, exc)
        return pb.CloseChannelResponse()

    async def ReleaseChannel(
        self, request: pb.ReleaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseChannelResponse:
        try:
            self._box(request.channel_id)
            self._hub.handle(ChannelReleased(request.channel_id))
            await committed(self._hub)
        except RouterError as exc:
            await abort(context, exc)
        return pb.ReleaseChannelResponse()
