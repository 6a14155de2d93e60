"""The routing core's leased channels: lease, publish, close, release,
results taken, and a channel restored from the journal. A mixin of
:class:`Router` (``_core``), on the state and moves of ``_state``. No I/O.

With a journal each change is a ``JournalChannel`` instruction (the hub
commits it before the subscriber hears of what follows); a task whose id
the channel already has is left out, so a publisher may resend.
"""

from __future__ import annotations

from orchestrator_service import _admission as admission
from orchestrator_service._channel import Channel
from orchestrator_service._events import (
    ChannelClosed,
    ChannelLeased,
    ChannelReleased,
    ChannelRestored,
    EndChannel,
    IpcMessage,
    JournalChannel,
    Refused,
    ResultsTaken,
    TasksPublished,
)
from orchestrator_service._journal_records import CLOSED, PUBLISHED, task_row
from orchestrator_service._model import Code
from orchestrator_service._restore import replay_channel
from orchestrator_service._state import RouterState


class ChannelRouting(RouterState):
    def _channel_leased(self, event: ChannelLeased) -> None:
        refused = admission.check_accepting(self.accepting)
        if refused is None and event.channel_id in self.channels:
            refused = Refused(Code.ALREADY_EXISTS, "channel id already leased")
        if refused is not None:
            self._out.append(refused)
            return
        now = self.clock()
        self.channels[event.channel_id] = Channel(event.channel_id, now, tenant=event.tenant)
        if self.config.journal:
            self._out.append(JournalChannel(
                event.channel_id, [], opened=True, created_at=now, tenant=event.tenant
            ))

    def _tasks_published(self, event: TasksPublished) -> None:
        channel = self.channels.get(event.channel_id)
        refused = admission.check_publish(channel, event.channel_id, event.tasks, self.config)
        if refused is not None:
            self._out.append(refused)
            return
        assert channel is not None
        now = self.clock()
        ids = channel.ids
        tasks = [t for t in event.tasks if t.task_id not in ids]
        if not tasks:
            return
        for task in tasks:
            task.routing_key = channel.id
            task.published_at = now
            channel.pending_ids.add(task.task_id)
            ids.add(task.task_id)
        if self.config.journal:
            self._out.append(
                JournalChannel(channel.id, [(PUBLISHED, [task_row(t) for t in tasks])])
            )
        self._enqueue(channel, tasks)

    def _channel_restored(self, event: ChannelRestored) -> None:
        key = event.channel_id
        if key in self.channels:
            self._out.append(Refused(Code.ALREADY_EXISTS, "channel id already leased"))
            return
        now = self.clock()
        state, _ = replay_channel(key, event.records)
        channel = self.channels[key] = Channel(key, event.created_at, tenant=event.tenant)
        channel.ids = state.ids
        channel.sender_closed = state.closed
        channel.pending_ids = set(state.outstanding)
        # What had its result before the restart counts as published and completed.
        channel.published = channel.completed = state.delivered
        if state.outstanding:
            self._enqueue(channel, list(state.outstanding.values()))
            if self.config.adoption_grace > 0 and self.adoption_until is None:
                self.adoption_until = now + self.config.adoption_grace
        if channel.drained:
            self._out.append(EndChannel(key, released=False))

    def _leased(self, channel_id: str, instead: str) -> Channel | None:
        """The leased channel ``channel_id``; else None, and the refusal goes
        out: unknown, or a directive's (``instead`` says what to call)."""
        channel = self.channels.get(channel_id)
        if channel is None:
            self._out.append(admission.unknown_channel(channel_id))
        elif channel.directive:
            self._out.append(Refused(
                Code.FAILED_PRECONDITION,
                f"channel {channel_id!r} belongs to a directive; {instead}",
            ))
        else:
            return channel
        return None

    def _channel_closed(self, event: ChannelClosed) -> None:
        channel = self._leased(event.channel_id, "end its input through RunDirective")
        if channel is None:
            return
        if not channel.sender_closed and self.config.journal:
            self._out.append(JournalChannel(channel.id, [(CLOSED,)]))
        channel.sender_closed = True
        if channel.drained:
            self._out.append(EndChannel(channel.id, released=False))

    def _channel_released(self, event: ChannelReleased) -> None:
        channel = self._leased(event.channel_id, "cancel it with CancelDirective")
        if channel is None:
            return
        self._terminate(channel, IpcMessage("abort", channel.id))
        self._release(channel)
        self._out.append(EndChannel(channel.id, released=True))

    def _results_taken(self, event: ResultsTaken) -> None:
        channel = self.channels.get(event.channel_id)
        if channel is not None:
            channel.unread -= event.count

