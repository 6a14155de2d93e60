"""Where the core's instructions meet the streams: the servicers' side of
``Router.handle``.

The hub feeds events to the core and executes every instruction it returns:
tasks and worker IPC go to the worker's link, items and credit to the
directive's call box, results to the channel's box, each with a wake-up for
the coroutine that writes that stream. A :class:`Refused` instruction is
raised to the caller as :class:`RouterError`. Nothing here decides routing.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from orchestrator_service._core import Router
from orchestrator_service._events import (
    CloseWorker,
    EmitItems,
    EmitResults,
    EndCall,
    EndChannel,
    Event,
    GrantCredit,
    IpcMessage,
    QueueUnserved,
    Refused,
    SendIpc,
    SendTasks,
    TasksCompleted,
)
from orchestrator_service._items import Items
from orchestrator_service._model import ChannelResult, RouterError, TaskRecord
from orchestrator_service._signal import Signal

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


@dataclass(eq=False)
class ChannelBox:
    """A channel's results, held until a subscriber takes them."""

    channel_id: str
    results: deque[ChannelResult] = field(default_factory=deque)
    ended: bool = False
    released: bool = False
    signal: Signal = field(default_factory=Signal)


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

    def handle(self, *events: Event) -> None:
        """Feed ``events`` to the core and execute what it answers; raises
        RouterError if it refused (after executing everything else)."""
        refused: Refused | None = None
        for instruction in self.router.handle(*events):
            kind = type(instruction)
            if kind is SendTasks:
                assert isinstance(instruction, SendTasks)
                link = self.workers.get(instruction.worker_id)
                if link is not None:
                    link.tasks.extend(instruction.tasks)
                    link.signal()
            elif kind is EmitItems:
                assert isinstance(instruction, EmitItems)
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
