"""Where the core's instructions meet the streams: the servicers' side of
``Router.handle``.

The hub feeds events to the core and executes every instruction it returns:
tasks and worker IPC go to the worker's link, items and credit to the
directive's call box, results to the channel's box, each with a wake-up for
the coroutine that writes that stream. A :class:`Refused` instruction is
raised to the caller as :class:`RouterError`. Nothing here decides routing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator_service._core import Router
from orchestrator_service._events import (
    CloseWorker,
    EmitItems,
    EmitResults,
    EndCall,
    EndChannel,
    Event,
    GrantCredit,
    Instruction,
    IpcMessage,
    Journal,
    JournalChannel,
    QueueUnserved,
    Refused,
    SendIpc,
    SendTasks,
    TasksCompleted,
)
from orchestrator_service._items import Items
from orchestrator_service._journal_records import (
    ENTRY_RECORDS,
    Summary,
    encode_channel_header,
    encode_plan,
    encode_records,
    encode_summary,
)
from orchestrator_service._journal_types import (
    Append,
    Entry,
    FinishStream,
    OpenStream,
    RemoveStream,
    StreamKind,
)
from orchestrator_service._model import ChannelResult, PlanSpec, RouterError, TaskRecord
from orchestrator_service._signal import Signal

if TYPE_CHECKING:
    from orchestrator_service._journal_types import Store, Write

log = logging.getLogger("squire.orchestrator")


@dataclass(eq=False)
class WorkerLink:
    """What waits to be written on one worker's stream."""

    worker_id: str
    tasks: list[TaskRecord] = field(default_factory=list)
    ipc: list[IpcMessage] = field(default_factory=list)
    closed: str | None = None  # why the core gave up on the worker
    signal: Signal = field(default_factory=Signal)


@dataclass(eq=False)
class CallBox:
    """What waits to be written on one directive's call, and its input credit."""

    directive_id: str
    signal: Signal
    items: Items = field(default_factory=Items)
    credit: int = 0
    end: EndCall | None = None
    accepted: int = 0  # input elements journaled (what an attaching caller resumes from)
    journaled: bool = False  # its plan is committed: "started" may go out
    input_journaled: bool = False  # the end of its input is committed
    # Another caller attached: this call ends with ABORTED, the directive runs on.
    displaced: str | None = None
    # The call that submitted a detached directive: results it happens to get
    # do not count as read (they are kept for --retention, for an attach).
    detached_submit: bool = False


@dataclass(eq=False)
class ChannelBox:
    """A channel's results, held until a subscriber takes them."""

    channel_id: str
    results: deque[ChannelResult] = field(default_factory=deque)
    # Results taken by subscribers so far: ``results[0]`` is the channel's
    # result number ``taken`` (from 0, in delivery order). With a journal,
    # those before it can be read back for a subscriber that lacks them.
    taken: int = 0
    ended: bool = False
    released: bool = False
    signal: Signal = field(default_factory=Signal)
    # The Subscribe call that may take results (one that resumes with a count
    # displaces the one before it); None: any.
    subscriber: object | None = None
    used: bool = True  # a call named it since it was restored (else it is an orphan)
    tenant: str = ""  # whose it is


class Hub:
    def __init__(
        self,
        router: Router,
        *,
        on_tasks_done: Callable[[list[TaskRecord], float], None] | None = None,
        on_directive_end: Callable[[str, float], None] | None = None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.router = router
        # 128 random bits, as hex: a channel id is the capability to use the
        # channel (uuid4().hex is the same, five times slower).
        self.new_id = new_id or (lambda: os.urandom(16).hex())
        self.workers: dict[str, WorkerLink] = {}
        self.calls: dict[str, CallBox] = {}
        self.channels: dict[str, ChannelBox] = {}
        self.on_tasks_done = on_tasks_done
        self.on_directive_end = on_directive_end
        self.store: Store | None = None
        # Instructions for callers held until the journal writes made before
        # them commit (in write order): (commit, instructions).
        self._held: deque[tuple[asyncio.Future[None] | None, list[Instruction]]] = deque()
        # Per journaled directive: items released to callers (values,
        # skipped), and input elements committed.
        self.released: dict[str, list[int]] = {}
        self.accepted: dict[str, int] = {}
        self.ended: dict[str, EndCall] = {}  # finished, their end not yet read by a caller
        self._forgotten: set[str] = set()  # dropped before their end came out of the core
        self.read_at: dict[str, float] = {}  # ended, end written to a caller: since when
        self.plans: dict[str, PlanSpec] = {}  # of every journaled directive
        self.removed = 0  # directives dropped from the journal (compaction follows)
        self.channel_streams: set[str] = set()  # leased channels open in the journal
        self.last_commit: asyncio.Future[None] | None = None  # of the latest journal write
        # Set while the orchestrator stops with a journal: calls end with
        # UNAVAILABLE and this message, and their directives live on.
        self.closing: str | None = None

    def journal_to(self, store: Store) -> None:
        """From now on, what callers are told waits for the journal (see
        ``_journal_records``): accepted means journaled, completed means journaled."""
        self.store = store

    def handle(self, *events: Event) -> None:
        """Feed ``events`` to the core and execute what it answers; raises
        RouterError if it refused (after executing everything else)."""
        instructions = self.router.handle(*events)
        if self.store is not None:
            instructions = self._journal(instructions)
        self._execute(instructions)

    def _journal(self, instructions: list[Instruction]) -> list[Instruction]:
        """Write the journal records; hold what callers would see until they
        commit. Returns the instructions to execute now."""
        now: list[Instruction] = []
        later: list[Instruction] = []
        opens: list[Write] = []
        entries: list[Entry] = []
        ends: list[Write] = []
        for instruction in instructions:
            kind = type(instruction)
            if kind is Journal:
                assert isinstance(instruction, Journal)
                key = instruction.directive_id
                if instruction.plan is not None:
                    opens.append(
                        OpenStream(
                            key, StreamKind.DIRECTIVE, encode_plan(instruction.plan),
                            instruction.created_at, instruction.plan.detached,
                        )
                    )
                    self.released[key] = [0, 0]
                    self.accepted[key] = 0
                    self.plans[key] = instruction.plan
                if instruction.records:
                    entries.append(Entry(key, ENTRY_RECORDS, encode_records(instruction.records)))
                later.append(instruction)
            elif kind is JournalChannel:
                assert isinstance(instruction, JournalChannel)
                key = instruction.channel_id
                if instruction.opened:
                    opens.append(OpenStream(
                        key, StreamKind.CHANNEL, encode_channel_header(instruction.tenant),
                        instruction.created_at,
                    ))
                    self.channel_streams.add(key)
                if instruction.records:
                    entries.append(Entry(key, ENTRY_RECORDS, encode_records(instruction.records)))
            elif kind is EmitItems or kind is GrantCredit or kind is EmitResults:
                later.append(instruction)
            elif kind is EndChannel:
                assert isinstance(instruction, EndChannel)
                if instruction.released and instruction.channel_id in self.channel_streams:
                    self.channel_streams.discard(instruction.channel_id)
                    ends.append(RemoveStream(instruction.channel_id))
                later.append(instruction)
            elif kind is EndCall:
                assert isinstance(instruction, EndCall)
                ends.append(FinishStream(instruction.directive_id, time.time(), encode_summary(
                    Summary(
                        instruction.state, instruction.code, instruction.message,
                        instruction.fold_value, instruction.emitted,
                        instruction.progress.received,
                    )
                )))
                later.append(instruction)
            else:
                now.append(instruction)
        writes = opens + ([Append(entries)] if entries else []) + ends
        assert self.store is not None
        commit = self.store.write(writes) if writes else None
        if commit is not None:
            self.last_commit = commit
        if later:
            if commit is None and not self._held:
                now.extend(later)
            else:
                self._held.append((commit, later))
                if commit is not None:
                    commit.add_done_callback(self._committed)
        return now

    async def committed(self) -> None:
        """Wait until every journal write made so far is committed (commits
        follow write order); raises the store's error if it gave up."""
        commit = self.last_commit
        if commit is not None and not commit.done():
            await asyncio.shield(commit)
        elif commit is not None and not commit.cancelled() and commit.exception() is not None:
            raise commit.exception()  # type: ignore[misc]

    def owner(self, directive_id: str) -> str | None:
        """The tenant of a running or kept directive; None: no such directive."""
        directive = self.router.directives.get(directive_id)
        if directive is not None:
            return directive.plan.tenant
        plan = self.plans.get(directive_id)
        return plan.tenant if plan is not None and directive_id in self.ended else None

    def wake_all(self) -> None:
        """Wake every directive call and subscriber (to see ``closing``)."""
        for box in list(self.calls.values()):
            box.signal()
        for channel in list(self.channels.values()):
            channel.signal()

    def _committed(self, _: asyncio.Future[None]) -> None:
        """A journal write committed: release what waited for it, in order."""
        held = self._held
        while held and (held[0][0] is None or held[0][0].done()):
            commit, instructions = held.popleft()
            if commit is not None and not commit.cancelled() and commit.exception() is not None:
                # Only at shutdown: the store gave up. Nothing that was not
                # journaled is told to a caller; they reattach to the next start.
                log.error("journal write failed: %s", commit.exception())
                continue
            self._execute(instructions)

    def delivered(self, box: CallBox) -> None:
        """A directive's end was written to its caller. Whether the caller got
        it is not known here (the connection may break just after), so the
        journal keeps it a while longer for a reattach (``Durable.sweep``).
        A detached directive's submitter is not its reader: that changes nothing."""
        directive_id = box.directive_id
        if box.detached_submit:
            return
        if self.store is not None and directive_id in self.released:
            self.read_at[directive_id] = self.router.clock()

    def forget(self, directive_id: str) -> None:
        """A directive's caller has its end, or gave it up: drop it from the
        journal (once it has ended, if it has not yet)."""
        if self.store is None or directive_id not in self.released:
            return
        if directive_id in self.router.directives:
            self._forgotten.add(directive_id)  # removed when its end comes
            return
        self.ended.pop(directive_id, None)
        self.read_at.pop(directive_id, None)
        self.plans.pop(directive_id, None)
        del self.released[directive_id]
        self.accepted.pop(directive_id, None)
        self.store.write([RemoveStream(directive_id)])
        self.removed += 1

    def _execute(self, instructions: list[Instruction]) -> None:
        refused: Refused | None = None
        for instruction in instructions:
            kind = type(instruction)
            if kind is SendTasks:
                assert isinstance(instruction, SendTasks)
                link = self.workers.get(instruction.worker_id)
                if link is not None:
                    link.tasks.extend(instruction.tasks)
                    link.signal()
            elif kind is EmitItems:
                assert isinstance(instruction, EmitItems)
                released = self.released.get(instruction.directive_id)
                if released is not None:
                    released[0] += len(instruction.items.indexes)
                    released[1] += len(instruction.items.skipped)
                box = self.calls.get(instruction.directive_id)
                if box is not None:
                    box.items.extend(instruction.items)
                    box.signal()
            elif kind is GrantCredit:
                assert isinstance(instruction, GrantCredit)
                box = self.calls.get(instruction.directive_id)
                if box is not None:
                    box.credit += instruction.count
                    box.signal()
            elif kind is EmitResults:
                assert isinstance(instruction, EmitResults)
                channel = self.channels.get(instruction.channel_id)
                if channel is not None:
                    channel.results.extend(instruction.results)
                    channel.signal()
            elif kind is TasksCompleted:
                assert isinstance(instruction, TasksCompleted)
                if self.on_tasks_done is not None:
                    self.on_tasks_done(instruction.tasks, instruction.now)
            else:
                refused = self._rare(instruction) or refused
        if refused is not None:
            raise RouterError(refused.code, refused.message)

    def _rare(self, instruction: object) -> Refused | None:
        if isinstance(instruction, Refused):
            return instruction
        if isinstance(instruction, Journal):
            # Committed: this many input elements are the directive's for good.
            self.accepted[instruction.directive_id] = instruction.received
            box = self.calls.get(instruction.directive_id)
            if box is not None:
                box.accepted = instruction.received
                box.input_journaled = instruction.input_closed
                box.journaled = True
                box.signal()
            return None
        if isinstance(instruction, SendIpc):
            link = self.workers.get(instruction.worker_id)
            if link is not None:
                link.ipc.append(instruction.ipc)
                link.signal()
        elif isinstance(instruction, CloseWorker):
            link = self.workers.get(instruction.worker_id)
            if link is not None:
                link.closed = instruction.message
                link.signal()
        elif isinstance(instruction, EndCall):
            if self.on_directive_end is not None:
                self.on_directive_end(instruction.state.value, instruction.duration)
            box = self.calls.get(instruction.directive_id)
            if box is not None:
                box.end = instruction
                box.signal()
            elif instruction.directive_id in self._forgotten:
                self._forgotten.discard(instruction.directive_id)
                self.forget(instruction.directive_id)
            if self.store is not None and instruction.directive_id in self.released:
                self.ended[instruction.directive_id] = instruction  # for a later caller
        elif isinstance(instruction, QueueUnserved):
            log.warning(instruction.message, extra={"queue": instruction.queue})
        elif isinstance(instruction, EndChannel):
            channel = self.channels.get(instruction.channel_id)
            if channel is not None:
                channel.ended = True
                if instruction.released:
                    channel.released = True
                    channel.results.clear()
                    del self.channels[instruction.channel_id]
                channel.signal()
        else:
            raise AssertionError(f"unknown instruction {instruction!r}")
        return None
