"""The worker's scheduling core: one stream session's tasks, without I/O.

``Scheduler.handle(*events)`` takes what happened (``_scheduler_events``)
and returns instructions: run these tasks, send these results, wake me at t.
The session turns stream messages and executor completions into events and
carries out the instructions; the scheduler never calls back into I/O, and
time comes from the injected ``clock`` (plain numbers).

Invariants, which ``validate()`` asserts:

- a task received is in exactly one place -- the local FIFO, running in the
  executor, or waiting to retry -- until it is reported, and reporting it
  takes it out of that place, so each is reported exactly once;
- at most ``capacity`` executor slots are taken: by running tasks, by tasks
  reported while their run goes on (timed out, handed back at the drain
  deadline) and by tasks of earlier sessions still running (``occupied``);
- a suspect of a shared pool crash runs alone;
- once draining, nothing waits in the FIFO or for a retry; once the stream
  is closed or broken, nothing is held and nothing more is sent.

A broken stream does not stop what runs: its running tasks and unsent
reports become the ``holdover`` the next stream's scheduler starts from
(named in that stream's hello, so the orchestrator adopts their results).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from worker_service._abort import AbortMemory
from worker_service._model import (
    RETURNED,
    TaskSpec,
    Transient,
    aborted_failure,
    crashed,
    exhausted,
    timed_out,
)
from worker_service._scheduler_check import validate_scheduler
from worker_service._scheduler_events import (
    AbortAllReceived,
    AbortReceived,
    CancelRunning,
    CloseStream,
    DrainExpired,
    DrainRequested,
    Event,
    ExecutionFinished,
    Holdover,
    Instruction,
    Phase,
    PoolCrashed,
    Report,
    Run,
    SchedulerConfig,
    SendCredit,
    SendResults,
    StreamBroken,
    TasksReceived,
    Tick,
    Wake,
)

log = logging.getLogger("worker_service.scheduler")


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        clock: Callable[[], float],
        aborted: AbortMemory,
        *,
        occupied: int = 0,
        holdover: Holdover | None = None,
    ) -> None:
        if config.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {config.capacity}")
        self.config = config
        self._capacity = config.capacity
        self._clock = clock
        self._aborted = aborted
        self.phase = Phase.RUNNING

        self._queue: deque[TaskSpec] = deque()
        # Suspects of a shared pool crash, each to run alone: the FIFO's head.
        self._alone: deque[TaskSpec] = deque()
        self._running: dict[TaskSpec, float] = {}    # -> when its run started
        self._deadlines: dict[TaskSpec, float] = {}  # those with a timeout -> when it passes
        self._waiting: dict[TaskSpec, float] = {}    # -> when its retry is due
        self._detached: set[TaskSpec] = set()        # reported, but their run holds a slot
        self._occupied = occupied                    # slots of earlier sessions' tasks
        self._isolated: TaskSpec | None = None       # a suspect running alone
        self._drain_at: float | None = None
        self._wake_at: float | None = None

        self._received = self._reported = self._dropped = self._handed_over = 0
        self._warned_window = False
        # Reports of an earlier stream, sent with this stream's first step.
        self._carried: list[Report] = []
        # What this stream leaves to the next one, once it broke.
        self.holdover: Holdover | None = None
        if holdover is not None:
            self._take_over(holdover)
        # The output of the handle() call under way.
        self._out: list[Instruction] = []
        self._reports: list[Report] = []
        self._cancel: list[TaskSpec] = []

    # ---------------------------------------------------------- probes

    @property
    def broken(self) -> bool:
        return self.phase is Phase.BROKEN

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def slots_taken(self) -> int:
        """Executor slots taken, as far as this session knows (which is exactly)."""
        return len(self._running) + len(self._detached) + self._occupied

    @property
    def buffered(self) -> int:
        return len(self._alone) + len(self._queue) + len(self._waiting)

    # ------------------------------------------------------------ entry

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply ``events`` in order; return what to do, in order."""
        if self.broken:
            return []
        out: list[Instruction] = []
        self._out = out
        self._reports = self._carried
        self._carried = []
        self._cancel = []
        for event in events:
            self._apply(event)
        if self.broken:  # by one of these events: only the abort signals go out
            out = self._out = []
        self._pump()
        if self._cancel:
            out.append(CancelRunning(self._cancel))
        if self._reports:
            self._reported += len(self._reports)
            out.append(SendResults(self._reports))
        if self.phase is Phase.DRAINING and not self._running:
            self.phase = Phase.CLOSED
            self._drain_at = None
            out.append(CloseStream())
        self._set_wake(out)
        return out

    def _apply(self, event: Event) -> None:
        match event:
            case ExecutionFinished():
                self._on_finished(event)
            case TasksReceived():
                self._on_tasks(event)
            case Tick():
                self._on_tick()
            case PoolCrashed():
                self._on_crash(event)
            case AbortReceived(keys):
                for key in keys:
                    self._abort_key(key)
            case AbortAllReceived():
                places = (self._alone, self._queue, self._running, self._waiting)
                held = {task.routing_key for place in places for task in place}
                log.info("aborting every routing key held (%d)", len(held))
                for key in held:
                    self._abort_key(key)
            case DrainRequested(grace):
                self._on_drain(grace)
            case DrainExpired():
                if self.phase is Phase.DRAINING:
                    self._hand_back(self._clock())
            case StreamBroken():
                self._on_broken()

    def _set_wake(self, out: list[Instruction]) -> None:
        at: float | None = self._drain_at
        for due in (self._waiting, self._deadlines):
            if due:
                first = min(due.values())
                if at is None or first < at:
                    at = first
        if at != self._wake_at:
            self._wake_at = at
            out.append(Wake(at))

    # ----------------------------------------------------------- events

    def _on_tasks(self, event: TasksReceived) -> None:
        tasks = event.tasks
        self._received += len(tasks)
        if self.phase is not Phase.RUNNING:
            if self.phase is Phase.DRAINING:
                self._reports.extend((task, RETURNED) for task in tasks)
            else:  # closed: nothing can be sent; the orchestrator re-queues them
                self._dropped += len(tasks)
            return
        aborted = self._aborted
        aborted.prune()
        queue = self._queue
        if not aborted:
            queue.extend(tasks)
        else:
            for task in tasks:
                if aborted.is_aborted(task.routing_key):
                    self._reports.append((task, aborted_failure(task.routing_key)))
                else:
                    queue.append(task)
        if not self._warned_window:
            held = len(queue) + len(self._running) + len(self._waiting)
            if held > self.config.window:
                self._warned_window = True
                log.warning("the orchestrator sent more tasks than the credit window: "
                            "%d held, window %d", held, self.config.window)

    def _on_finished(self, event: ExecutionFinished) -> None:
        running = self._running
        reports = self._reports
        deadlines = self._deadlines
        again: list[TaskSpec] = []
        for task, outcome, seconds in event.results:
            if running.pop(task, None) is None:
                self._stray(task)
                continue
            if deadlines:
                deadlines.pop(task, None)
            if task is self._isolated:
                self._isolated = None
            task.elapsed += seconds
            if 0 < task.timeout_seconds < seconds:
                outcome = timed_out(task)
            if isinstance(outcome, Transient):
                if self._retry(task, outcome):
                    again.append(task)
            else:
                reports.append((task, outcome))
        again += [t for t in event.returned if self._ended(t) and not self._reported_instead(t)]
        if event.capacity is not None:  # never below the slots taken
            self._capacity = event.capacity
        # Retries due at once, then tasks handed back unstarted, go first, as if
        # they had never left the executor.
        self._requeue(again)

    def _on_crash(self, event: PoolCrashed) -> None:
        again: list[TaskSpec] = []
        for task, seconds in event.crashed:
            if not self._ended(task):
                continue
            if event.shared and not task.suspect:
                # Blaming every task of a broken pool would let a poison task
                # take innocent ones (even of other directives) down with it:
                # each runs again alone, and only a crash there is reported.
                log.warning(
                    "task %s/%d (%s) shared a process pool that broke; running it again alone",
                    task.routing_key, task.task_id, task.operation, extra=task.log_fields(),
                )
                task.suspect = True
                if not self._reported_instead(task):
                    again.append(task)
                continue
            log.error("task %s/%d (%s) lost: an executor process died", task.routing_key,
                      task.task_id, task.operation, extra=task.log_fields())
            task.elapsed += seconds
            self._reports.append((task, crashed(event.error_type)))
        self._requeue(again)

    def _on_tick(self) -> None:
        now = self._clock()
        self._wake_at = None  # that wake-up is spent; _set_wake asks for the next one
        waiting = self._waiting
        if waiting:
            due = sorted((t for t, at in waiting.items() if at <= now), key=waiting.__getitem__)
            for task in due:
                del waiting[task]
            self._requeue([t for t in due if not self._reported_instead(t)])
        if self._deadlines:
            for task in [t for t, at in self._deadlines.items() if at <= now]:
                del self._deadlines[task]
                self._detach(task, now)
                self._reports.append((task, timed_out(task)))
        if self._drain_at is not None and self._drain_at <= now:
            self._hand_back(now)

    def _on_drain(self, grace: float) -> None:
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.DRAINING
        self._out.append(SendCredit(0))
        reports = self._reports
        for place in (self._alone, self._queue, self._waiting):
            reports.extend((task, RETURNED) for task in place)
        self._alone.clear()
        self._queue.clear()
        self._waiting.clear()
        self._drain_at = self._clock() + grace

    def _take_over(self, holdover: Holdover) -> None:
        self._running.update(holdover.running)
        for task, started in holdover.running.items():
            if task.timeout_seconds > 0:
                self._deadlines[task] = started + task.timeout_seconds
        self._detached |= holdover.detached
        self._carried = list(holdover.reports)
        self._received = len(holdover.running) + len(holdover.reports)

    def _on_broken(self) -> None:
        # What waits is re-queued by the orchestrator (a new one does it from
        # its journal). What runs goes on, and it and the reports not yet
        # sent are handed over: the next stream names them in its hello.
        self.holdover = Holdover(dict(self._running), self._reports, set(self._detached))
        self._handed_over = len(self._running) + len(self._reports)
        self._dropped += self.buffered
        self._reports = []
        self._detached = set()
        self._alone.clear()
        self._queue.clear()
        self._running.clear()
        self._deadlines.clear()
        self._waiting.clear()
        self._isolated = None
        self._drain_at = None
        self.phase = Phase.BROKEN

    # ---------------------------------------------------------- helpers

    def _pump(self) -> None:
        """Start queued tasks while slots are free."""
        if self._isolated is not None or self.phase is not Phase.RUNNING:
            return
        capacity = self._capacity
        free = capacity - self.slots_taken
        if free <= 0:
            return
        queue = self._queue
        if self._alone:
            # Alone in the pool: if it crashes now, the crash is its own.
            if free < capacity:
                return
            self._isolated = self._alone.popleft()
            tasks = [self._isolated]
        elif not queue:
            return
        elif free >= len(queue):
            tasks = list(queue)
            queue.clear()
        else:
            tasks = [queue.popleft() for _ in range(free)]
        now = self._clock()
        self._running.update(dict.fromkeys(tasks, now))
        for task in tasks:
            if task.timeout_seconds > 0:
                self._deadlines[task] = now + task.timeout_seconds
        self._out.append(Run(tasks))

    def _requeue(self, tasks: list[TaskSpec]) -> None:
        """Put ``tasks`` back at the head of the FIFO, in this order."""
        for task in reversed(tasks):
            (self._alone if task.suspect else self._queue).appendleft(task)

    def _retry(self, task: TaskSpec, transient: Transient) -> bool:
        """Handle a transient failure; True when the task should run again at once."""
        if transient.delay is None:
            self._reports.append((task, exhausted(transient, task.retries)))
            return False
        if self._reported_instead(task):
            return False
        task.retries += 1
        log.debug(
            "task %s/%d: %s, retry %d in %.3fs", task.routing_key, task.task_id,
            transient.message, task.retries, transient.delay,
        )
        if transient.delay <= 0:
            return True
        # Waiting holds no executor slot: other tasks run meanwhile.
        self._waiting[task] = self._clock() + transient.delay
        return False

    def _reported_instead(self, task: TaskSpec) -> bool:
        """Report ``task`` if it may not run again: draining, or its key aborted."""
        if self.phase is not Phase.RUNNING:
            self._reports.append((task, RETURNED))
        elif self._aborted.is_aborted(task.routing_key):
            self._reports.append((task, aborted_failure(task.routing_key)))
        else:
            return False
        return True

    def _abort_key(self, key: str) -> None:
        self._aborted.remember(key)
        failure = aborted_failure(key)
        for queue in (self._alone, self._queue):
            if any(task.routing_key == key for task in queue):
                kept = [task for task in queue if task.routing_key != key]
                self._reports.extend((task, failure) for task in queue if task.routing_key == key)
                queue.clear()
                queue.extend(kept)
        for task in [t for t in self._waiting if t.routing_key == key]:
            del self._waiting[task]
            self._reports.append((task, failure))
        # Running tasks see their abort signal and report however they end.
        self._cancel.extend(t for t in self._running if t.routing_key == key)

    def _detach(self, task: TaskSpec, now: float) -> None:
        """``task`` is reported now, though its run goes on holding a slot."""
        task.elapsed += now - self._running.pop(task)
        self._detached.add(task)
        self._cancel.append(task)
        if task is self._isolated:
            self._isolated = None

    def _hand_back(self, now: float) -> None:
        self._drain_at = None
        if not self._running:
            return
        log.warning(
            "handing back %d task(s) still running at the drain deadline", len(self._running),
        )
        self._deadlines.clear()
        for task in list(self._running):
            self._detach(task, now)
            self._reports.append((task, RETURNED))

    def _ended(self, task: TaskSpec) -> bool:
        """Take ``task``'s run out of running; False if this session did not wait for it."""
        if self._running.pop(task, None) is None:
            self._stray(task)
            return False
        self._deadlines.pop(task, None)
        if task is self._isolated:
            self._isolated = None
        return True

    def _stray(self, task: TaskSpec) -> None:
        """A run this session does not wait for ended: its slot is free again."""
        if task in self._detached:
            self._detached.remove(task)
        elif self._occupied > 0:
            self._occupied -= 1

    # --------------------------------------------------------- checking

    def validate(self) -> None:
        """Assert every invariant of the module docstring."""
        validate_scheduler(self)
