"""The routing core's invariants, asserted after every simulated step.

Read-only: walks the Router's state and raises AssertionError naming the
first invariant that does not hold (see the ``_core`` module docstring).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from orchestrator_service._model import QueueKey

if TYPE_CHECKING:
    from orchestrator_service._state import RouterState


def validate_router(router: RouterState) -> None:
    places: Counter[int] = Counter()  # id(task) -> how many places hold it
    depths: Counter[QueueKey] = Counter()
    for channel in router.channels.values():
        queued = 0
        for key, fifo in channel.fifos.items():
            for task in fifo:
                assert task.routing_key == channel.id, f"task of {task.routing_key} in {channel.id}"
                assert (task.kind, task.operation) == key, f"task {task.task_id} in fifo {key}"
                assert task.lease_id == 0, f"queued task {task.task_id} holds lease {task.lease_id}"
                places[id(task)] += 1
            queued += len(fifo)
            depths[key] += len(fifo)
        assert channel.queued == queued, f"channel {channel.id}: queued"
        assert (channel.id in router._ready) == (queued > 0), f"channel {channel.id}: ready set"
        assert channel.unread >= 0, f"channel {channel.id}: unread {channel.unread}"
        assert channel.completed <= channel.published, f"channel {channel.id}: completed"
        assert channel.directive == (channel.id in router.directives), f"channel {channel.id}"
        if not channel.directive:
            assert channel.pending_ids <= channel.ids, f"channel {channel.id}: a pending id unknown"
            assert len(channel.pending_ids) == channel.published - channel.completed, (
                f"channel {channel.id}: {len(channel.pending_ids)} ids pending, "
                f"{channel.published - channel.completed} tasks without a result"
            )
    for key, queue in router.queues.items():
        assert queue.depth == depths[key], f"queue {key}: depth {queue.depth} != {depths[key]}"
    assert set(router._ready) <= set(router.channels), "a released channel is still ready"
    leased: Counter[str] = Counter()
    for worker in router.workers.values():
        bound = max(worker.window, worker.held_at_resize)
        assert len(worker.leases) <= bound, (
            f"worker {worker.id} holds {len(worker.leases)} tasks; its window is {worker.window}"
        )
        for lease_id, task in worker.leases.items():
            assert task.lease_id == lease_id, f"lease {lease_id} != {task.lease_id}"
            assert (task.kind, task.operation) in worker.supports, (
                f"worker {worker.id} holds {task.operation!r}, which it does not offer"
            )
            places[id(task)] += 1
            leased[task.routing_key] += 1
    twice = [n for n in places.values() if n > 1]
    assert not twice, f"{len(twice)} task(s) are in more than one place"
    for channel in router.channels.values():
        assert channel.leased == leased[channel.id], (
            f"channel {channel.id}: leased {channel.leased} != {leased[channel.id]}"
        )
        assert channel.queued + channel.leased <= channel.published - channel.completed, (
            f"channel {channel.id}: more tasks held than published and not completed"
        )
    for directive in router.directives.values():
        assert not directive.finished, f"directive {directive.id} finished but still held"
        assert directive.completed <= directive.received, f"directive {directive.id}"
        assert directive.credited <= directive.completed, f"directive {directive.id}"
