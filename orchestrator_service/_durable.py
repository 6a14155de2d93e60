"""Durable directives on the wire: recovery at startup, attach by id, the
list and cancel calls, and the sweep of orphans and expired results.

The journal itself is written by the hub (``Hub.journal_to``); this module
reads it back. At startup every directive in the journal is either restored
into the core (``DirectiveRestored``: it goes on where it stood) or, if it
had finished, kept with its end for a caller to read. A caller attaches with
how many items it already has; what it lacks is replayed from the journal
(the same replay that restores a directive, so the order is the one it was
emitted in), then the call goes on live. Nothing here decides routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service import _convert as convert
from orchestrator_service._events import (
    ChannelReleased,
    ChannelRestored,
    DirectiveCancelled,
    DirectiveRestored,
    EndCall,
)
from orchestrator_service._hub import CallBox, ChannelBox, Hub
from orchestrator_service._items import Items
from orchestrator_service._journal_records import (
    DELIVERED,
    ENTRY_RECORDS,
    Record,
    decode_channel_header,
    decode_plan,
    decode_records,
    decode_summary,
)
from orchestrator_service._journal_types import StreamKind
from orchestrator_service._model import Code, PlanSpec, ProgressSnapshot, RouterError
from orchestrator_service._restore import replay
from orchestrator_service._signal import Signal
from orchestrator_service._tenants import caller

if TYPE_CHECKING:
    from orchestrator_service._journal_types import Recovered, StoredStream

log = logging.getLogger("squire.orchestrator")


@dataclass(frozen=True)
class Missing:
    """Items an attaching caller lacks: values [v0, v1) and skipped [s0, s1)."""

    v0: int
    v1: int
    s0: int
    s1: int


@dataclass(frozen=True)
class Retention:
    reattach_grace: float = 120.0  # a restored directive waits this long for its caller
    retention: float = 86_400.0  # a finished, unread directive's results are kept this long


def check_journal(hub: Hub, plan: PlanSpec) -> None:
    """Refuse a new directive the journal cannot take: while its commits
    fail (disk full: RESOURCE_EXHAUSTED; read-only or broken: UNAVAILABLE),
    or a detached one without a journal. Running directives are not touched;
    what they already had acknowledged is committed once the fault is gone."""
    failure = hub.store.failure if hub.store is not None else None
    if failure is not None:
        raise RouterError(
            Code(failure.code) if failure.code in Code.__members__ else Code.UNAVAILABLE,
            f"new directives are refused while the journal cannot be written: {failure.message}",
        )
    if plan.detached and hub.store is None:
        raise RouterError(
            Code.FAILED_PRECONDITION,
            "a detached directive needs a journal; this orchestrator runs with --store memory:",
        )


def records_of(stream: StoredStream) -> list[Record]:
    records: list[Record] = []
    for kind, payload in stream.entries:
        if kind == ENTRY_RECORDS:
            records.extend(decode_records(payload))
    return records


class Durable:
    def __init__(self, hub: Hub, retention: Retention) -> None:
        self.hub = hub
        self.retention = retention
        self.orphans: dict[str, float] = {}  # restored directive -> when it is given up
        self.finished_at: dict[str, float] = {}  # ended, unread -> wall time it ended
        self.channels_resumed = 0  # leased channels restored at start

    # ------------------------------------------------------------ recovery

    def recover(self, recovered: Recovered) -> int:
        """Put what the journal holds back in place; returns how many
        directives were resumed (``channels_resumed`` counts the channels)."""
        hub = self.hub
        wall, mono = time.time(), hub.router.clock()
        operands = hub.router.config.max_fold_operands
        resumed = 0
        for stream in recovered.streams:
            key = stream.stream_id
            if stream.kind == StreamKind.CHANNEL:
                self._recover_channel(stream, mono - max(0.0, wall - stream.created_at))
                self.channels_resumed += 1
                continue
            plan = decode_plan(stream.header)
            hub.plans[key] = plan
            records = records_of(stream)
            created = mono - max(0.0, wall - stream.created_at)
            if stream.summary is not None:
                summary = decode_summary(stream.summary)
                hub.ended[key] = EndCall(
                    key, summary.state, summary.code, summary.message, summary.fold_value,
                    ProgressSnapshot(summary.received, 0, 0, summary.received, 0, 0, 0, 0),
                    0.0, summary.items,
                )
                self.finished_at[key] = stream.finished_at or wall
                directive, _, items = replay(
                    key, plan, records, max_fold_operands=operands, now=0.0
                )
                hub.released[key] = [len(items.indexes), len(items.skipped)]
                hub.accepted[key] = directive.received
                continue
            hub.handle(DirectiveRestored(key, plan, records, created))
            restored = hub.router.directives.get(key)
            if restored is not None:
                resumed += 1
                skipped = restored.skipped if plan.fold is None else 0
                hub.released[key] = [restored.emitted - skipped, skipped]
                hub.accepted[key] = restored.received
                if not plan.detached:
                    self.orphans[key] = mono + self.retention.reattach_grace
        return resumed

    def _recover_channel(self, stream: StoredStream, created: float) -> None:
        """A leased channel goes on where it stood; its subscriber resumes
        with how many results it has (those before are read back from the
        journal). Nobody naming it within the reattach grace releases it."""
        hub = self.hub
        key = stream.stream_id
        records = records_of(stream)
        delivered = sum(len(r[1]) for r in records if r[0] == DELIVERED)
        tenant = decode_channel_header(stream.header)
        hub.channels[key] = ChannelBox(key, taken=delivered, used=False, tenant=tenant)
        hub.channel_streams.add(key)
        hub.handle(ChannelRestored(key, records, created, tenant))
        self.orphans[key] = hub.router.clock() + self.retention.reattach_grace

    # ---------------------------------------------------------------- sweep

    def sweep(self) -> None:
        """Give up on orphans nobody reattached to; drop expired results."""
        hub = self.hub
        now = hub.router.clock()
        for key, deadline in list(self.orphans.items()):
            channel = hub.channels.get(key)
            if channel is not None:
                if channel.used:
                    del self.orphans[key]
                elif now >= deadline:
                    del self.orphans[key]
                    log.info(
                        "nobody came back for the channel; released",
                        extra={"routing_key": key, "grace": self.retention.reattach_grace},
                    )
                    hub.handle(ChannelReleased(key))
                continue
            if key in hub.calls or key not in hub.router.directives:
                del self.orphans[key]
            elif now >= deadline:
                del self.orphans[key]
                log.info(
                    "no caller reattached; directive cancelled",
                    extra={"routing_key": key, "grace": self.retention.reattach_grace},
                )
                hub.handle(DirectiveCancelled(key))
                hub.forget(key)
        linger = self.retention.reattach_grace
        for key, read_at in list(hub.read_at.items()):
            if now - read_at >= linger:
                hub.forget(key)  # its caller had time to come back for it
        wall = time.time()
        for key in list(hub.ended):
            if key not in self.finished_at:
                self.finished_at[key] = wall
            if wall - self.finished_at[key] >= self.retention.retention:
                hub.forget(key)
        for key in list(self.finished_at):
            if key not in hub.ended:
                del self.finished_at[key]

    # --------------------------------------------------------------- attach

    def open_attach(
        self, attach: pb.AttachDirective
    ) -> tuple[CallBox, pb.DirectiveStarted, Missing | None]:
        """Register a call box for ``attach``; the started event to send, and
        whether items must be replayed first (None: nothing is missing)."""
        hub = self.hub
        key = attach.directive_id
        if hub.store is None:
            raise RouterError(
                Code.FAILED_PRECONDITION,
                "attaching needs a journal; this orchestrator runs with --store memory:",
            )
        directive = hub.router.directives.get(key)
        end = hub.ended.get(key)
        owner = hub.owner(key)
        if (directive is None and end is None) or owner is None or not caller().may_see(owner):
            # Another tenant's directive is as unknown as a missing one (no probing).
            raise RouterError(
                Code.NOT_FOUND,
                f"no directive {key!r} (a finished one is kept until it is read, "
                f"or for --retention {self.retention.retention:g} s)",
            )
        old = hub.calls.pop(key, None)
        if old is not None:
            # The latest attach wins: the earlier call may be one whose
            # connection broke unnoticed, or a detached submit still closing.
            # It ends with ABORTED; what it had not written is replayed here.
            old.displaced = f"another caller attached to directive {key!r}"
            old.items = Items()
            old.signal()
        values, skipped = hub.released.get(key, [0, 0])
        if attach.values_received > values or attach.skipped_received > skipped:
            raise RouterError(
                Code.INVALID_ARGUMENT,
                f"directive {key!r} emitted {values} values and {skipped} skipped items; "
                f"the caller claims {attach.values_received} and {attach.skipped_received}",
            )
        box = CallBox(key, Signal())
        window = hub.router.config.directive_window
        started = pb.DirectiveStarted(directive_id=key, attached=True)
        plan = hub.plans.get(key)
        if plan is not None:
            started.serializer = plan.serializer  # type: ignore[assignment]
        if directive is not None:
            box.credit = window - (directive.received - directive.credited)
            box.input_journaled = started.input_closed = directive.input_closed
        else:
            assert end is not None
            box.end = end
            started.input_closed = True
        box.accepted = hub.accepted.get(key, 0)
        started.received = box.accepted
        hub.calls[key] = box
        self.orphans.pop(key, None)
        missing = None
        if attach.values_received < values or attach.skipped_received < skipped:
            missing = Missing(attach.values_received, values, attach.skipped_received, skipped)
        return box, started, missing

    async def missing_items(self, key: str, ranges: Missing) -> tuple[Items, int]:
        """The items of ``key`` in the ranges ``open_attach`` gave, replayed
        from the journal in emission order; and the plan's serializer."""
        store = self.hub.store
        assert store is not None
        stream = await store.read(key)
        if stream is None:
            raise RouterError(Code.NOT_FOUND, f"directive {key!r} is not in the journal")
        plan = decode_plan(stream.header)
        records = records_of(stream)
        _, _, items = await asyncio.to_thread(
            replay, key, plan, records,
            max_fold_operands=self.hub.router.config.max_fold_operands, now=0.0,
        )
        out = Items()
        out.indexes = items.indexes[ranges.v0 : ranges.v1]
        out.values = items.values[ranges.v0 : ranges.v1]
        out.skipped = items.skipped[ranges.s0 : ranges.s1]
        return out, plan.serializer

    # ------------------------------------------------------------ list, cancel

    def list_directives(self) -> pb.ListDirectivesResponse:
        hub = self.hub
        router = hub.router
        now = router.clock()
        response = pb.ListDirectivesResponse()
        who = caller()
        for d in router.directives.values():
            if not who.may_see(d.plan.tenant):
                continue
            response.directives.append(
                pb.DirectiveInfo(
                    directive_id=d.id, plan=d.plan.describe(), state="running",
                    detached=d.plan.detached, attached=d.id in hub.calls,
                    age_seconds=now - d.started_at, received=d.received, completed=d.completed,
                    tenant=d.plan.tenant,
                )
            )
        wall = time.time()
        for key, end in hub.ended.items():
            tenant = hub.plans[key].tenant if key in hub.plans else ""
            if not who.may_see(tenant):
                continue
            response.directives.append(
                pb.DirectiveInfo(
                    directive_id=key, state=end.state.value,
                    plan=hub.plans[key].describe() if key in hub.plans else "",
                    detached=key in hub.plans and hub.plans[key].detached,
                    attached=key in hub.calls,
                    age_seconds=wall - self.finished_at.get(key, wall),
                    received=end.progress.received, completed=end.emitted,
                    message=end.message, tenant=tenant,
                )
            )
        return response

    def cancel(self, key: str) -> None:
        hub = self.hub
        owner = hub.owner(key)
        if owner is None or not caller().may_see(owner):
            raise RouterError(Code.NOT_FOUND, f"no directive {key!r}")
        if key in hub.router.directives:
            hub.handle(DirectiveCancelled(key))
            if key not in hub.calls:
                hub.forget(key)
            return
        if key in hub.ended:
            hub.forget(key)
            return
        raise RouterError(Code.NOT_FOUND, f"no directive {key!r}")


async def write_missing(
    durable: Durable, box: CallBox, ranges: Missing, context: grpc.aio.ServicerContext
) -> None:
    items, _ = await durable.missing_items(box.directive_id, ranges)
    events = convert.EventsToWrite()
    convert.add_items(events.new, items)
    for event in events:
        await context.write(event)

