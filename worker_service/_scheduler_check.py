"""The worker scheduler's invariants (its module docstring), asserted by
``Scheduler.validate()`` after every step in the tests and the simulator."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker_service._scheduler_events import Phase

if TYPE_CHECKING:
    from worker_service._scheduler import Scheduler


def validate_scheduler(s: Scheduler) -> None:
    fifo = [*s._alone, *s._queue]
    queued, running, waiting = set(fifo), set(s._running), set(s._waiting)
    assert len(queued) == len(fifo), "a task is twice in the FIFO"
    assert all(task.suspect for task in s._alone)
    assert not any(task.suspect for task in s._queue), "a suspect would not run alone"
    places = (queued, running, waiting, s._detached)
    assert sum(map(len, places)) == len(set().union(*places)), "a task is in two places"
    held = len(fifo) + len(running) + len(waiting) + len(s._carried)
    assert s._received == held + s._reported + s._dropped + s._handed_over, (
        f"received {s._received} != held {held} + reported {s._reported}"
        f" + dropped {s._dropped} + handed over {s._handed_over}"
    )
    taken = s.slots_taken
    assert taken <= s._capacity, f"{taken} slots taken of {s._capacity}"
    assert set(s._deadlines) <= running, "a deadline for a task not running"
    assert all(t.timeout_seconds > 0 for t in s._deadlines)
    if s._isolated is not None:
        assert running == {s._isolated} and taken == 1, "a suspect does not run alone"
    if s.phase is not Phase.RUNNING:
        assert not fifo and not waiting, f"tasks wait while {s.phase.value}"
    if s.phase in (Phase.CLOSED, Phase.BROKEN):
        assert not running, f"tasks run while {s.phase.value}"
        assert s._drain_at is None
    if s.phase is Phase.BROKEN:
        assert s._wake_at is None
