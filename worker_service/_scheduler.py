"""The worker's scheduling core: one stream session's tasks, without I/O.

``Scheduler.handle(*events)`` takes what happened (``_scheduler_events``)
and returns instructions: run these jobs, send these results, wake me at t.
The session turns stream messages and executor completions into events and
carries out the instructions; the scheduler never calls back into I/O, and
time comes from the injected ``clock`` (plain numbers).

Invariants, which ``validate()`` asserts:

- a task received is in exactly one place -- the local FIFO, running in the
  executor, or waiting to retry -- until it is reported, and reporting it
  takes it out of that place, so each is reported exactly once;
- at most ``capacity`` executor slots are taken: by running jobs, by jobs
  reported while their run goes on (timed out, handed back at the drain
  deadline) and by tasks of earlier sessions still running (``occupied``);
- a suspect of a shared pool crash runs alone;
- once draining, nothing waits in the FIFO or for a retry; once the stream
  is closed or broken, nothing is held and nothing more is sent.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from squire_kernel.retry import FatalStrategy
from worker_service._abort import AbortMemory
from worker_service._model import ErrorKind, Failure, TaskSpec, Transient
from worker_service._scheduler_events import (
    AbortAllReceived,
    AbortReceived,
    CancelRunning,
    CloseStream,
    DrainExpired,
    DrainRequested,
    Event,
    ExecutionFinished,
    Instruction,
    Job,
    PoolCrashed,
    Report,
    Run,
    SendCredit,
    SendResults,
    StreamBroken,
    TasksReceived,
    Tick,
    Wake,
)

log = logging.getLogger("worker_service.scheduler")

RETURNED = Failure(ErrorKind.RETURNED, "Returned", "the worker is draining")


class Phase(enum.Enum):
    RUNNING = "running"    # taking tasks
    DRAINING = "draining"  # credit 0 sent: finishing what runs, returning the rest
    CLOSED = "closed"      # drained: the stream is being closed, nothing more is sent
    BROKEN = "broken"      # the stream is gone: everything was forgotten


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    capacity: int  # executor slots: jobs running at once
    window: int    # the credit window the orchestrator should respect


def aborted_failure(key: str) -> Failure:
    return Failure(ErrorKind.ABORTED, "Aborted", f"routing key {key!r} was aborted")


def timed_out(task: TaskSpec) -> Failure:
    return Failure(
        ErrorKind.TIMEOUT, "TimeoutError", f"ran longer than {task.timeout_seconds:g}s",
    )


def _context(task: TaskSpec) -> dict[str, object]:
    """Structured log fields of a task (see squire_kernel.logs)."""
    return {"routing_key": task.routing_key, "task_id": task.task_id, "operation": task.operation}


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        clock: Callable[[], float],
        aborted: AbortMemory,
        *,
        occupied: int = 0,
    ) -> None:
        if config.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {config.capacity}")
        self.config = config
        self._capacity = config.capacity
        self._clock = clock
        self._aborted = aborted
        self.phase = Phase.RUNNING

        self._queue: deque[Job] = deque()
        self._running: dict[Job, float] = {}    # -> when its run started
        self._deadlines: dict[Job, float] = {}  # running jobs with a timeout -> when it passes
        self._waiting: dict[Job, float] = {}    # -> when its retry is due
        self._detached: set[Job] = set()        # reported, but their run holds a slot
        self._occupied = occupied               # slots of earlier sessions' tasks
        self._isolated: Job | None = None       # a suspect running alone
        self._drain_at: float | None = None
        self._wake_at: float | None = None

        self._received = self._reported = self._dropped = 0
        self._warned_window = False
        # The output of the handle() call under way.
        self._out: list[Instruction] = []
        self._reports: list[Report] = []
        self._cancel: list[Job] = []

    # ---------------------------------------------------------- probes

    @property
    def broken(self) -> bool:
        return self.phase is Phase.BROKEN

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def buffered(self) -> int:
        return len(self._queue) + len(self._waiting)

    # ------------------------------------------------------------ entry

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply ``events`` in order; return what to do, in order."""
        if self.broken:
            return []
        out: list[Instruction] = []
        self._out = out
        self._reports = []
        self._cancel = []
        for event in events:
            self._apply(event)
        if self.broken:  # by one of these events
            return self._broken_output()
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
                self._on_tick(event)
            case PoolCrashed():
                self._on_crash(event)
            case AbortReceived():
                self._on_abort(event)
            case AbortAllReceived():
                self._on_abort_all(event)
            case DrainRequested():
                self._on_drain(event)
            case DrainExpired():
                self._on_drain_expired(event)
            case StreamBroken():
                self._on_broken(event)

    def _broken_output(self) -> list[Instruction]:
        out: list[Instruction] = []
        if self._cancel:
            out.append(CancelRunning(self._cancel))
        if self._wake_at is not None:
            self._wake_at = None
            out.append(Wake(None))
        return out

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
                self._reports.extend((Job(task), RETURNED) for task in tasks)
            else:  # closed: nothing can be sent; the orchestrator re-queues them
                self._dropped += len(tasks)
            return
        aborted = self._aborted
        aborted.prune()
        queue = self._queue
        if not aborted:
            queue.extend(map(Job, tasks))
        else:
            for task in tasks:
                if aborted.is_aborted(task.routing_key):
                    self._reports.append((Job(task), aborted_failure(task.routing_key)))
                else:
                    queue.append(Job(task))
        if not self._warned_window:
            held = len(queue) + len(self._running) + len(self._waiting)
            if held > self.config.window:
                self._warned_window = True
                log.warning(
                    "the orchestrator sent more tasks than the credit window: "
                    "%d held, window %d", held, self.config.window,
                )

    def _on_finished(self, event: ExecutionFinished) -> None:
        running = self._running
        reports = self._reports
        deadlines = self._deadlines
        again: list[Job] = []
        for job, outcome, seconds in event.results:
            if running.pop(job, None) is None:
                self._stray(job)
                continue
            if deadlines:
                deadlines.pop(job, None)
            if job is self._isolated:
                self._isolated = None
            job.elapsed += seconds
            task = job.task
            if 0 < task.timeout_seconds < seconds:
                outcome = timed_out(task)
            if isinstance(outcome, Transient):
                if self._retry(job, outcome):
                    again.append(job)
            else:
                reports.append((job, outcome))
        # A retry due at once goes first, as if it had never left the executor.
        self._queue.extendleft(reversed(again))

    def _on_crash(self, event: PoolCrashed) -> None:
        again: list[Job] = []
        for job, seconds in event.crashed:
            if self._running.pop(job, None) is None:
                self._stray(job)
                continue
            self._deadlines.pop(job, None)
            if job is self._isolated:
                self._isolated = None
            task = job.task
            if event.shared and not job.suspect:
                # Blaming every task of a broken pool would let a poison task
                # take innocent ones (even of other directives) down with it:
                # each runs again alone, and only a crash there is reported.
                log.warning(
                    "task %s/%d (%s) shared a process pool that broke; running it again alone",
                    task.routing_key, task.task_id, task.operation, extra=_context(task),
                )
                job.suspect = True
                if self.phase is Phase.DRAINING:
                    self._reports.append((job, RETURNED))
                elif self._aborted.is_aborted(task.routing_key):
                    self._reports.append((job, aborted_failure(task.routing_key)))
                else:
                    again.append(job)
                continue
            log.error(
                "task %s/%d (%s) lost: an executor process died",
                task.routing_key, task.task_id, task.operation, extra=_context(task),
            )
            job.elapsed += seconds
            self._reports.append((job, Failure(
                ErrorKind.CRASHED, event.error_type,
                "the executor process died while running the task",
            )))
        self._queue.extendleft(reversed(again))

    def _on_tick(self, _: Tick) -> None:
        now = self._clock()
        self._wake_at = None  # that wake-up is spent; _set_wake asks for the next one
        waiting = self._waiting
        if waiting:
            due = sorted((job for job, at in waiting.items() if at <= now), key=waiting.__getitem__)
            again: list[Job] = []
            for job in due:
                del waiting[job]
                key = job.task.routing_key
                if self._aborted.is_aborted(key):
                    self._reports.append((job, aborted_failure(key)))
                else:
                    again.append(job)
            self._queue.extendleft(reversed(again))
        if self._deadlines:
            for job in [j for j, at in self._deadlines.items() if at <= now]:
                del self._deadlines[job]
                self._detach(job, now)
                self._reports.append((job, timed_out(job.task)))
        if self._drain_at is not None and self._drain_at <= now:
            self._hand_back(now)

    def _on_abort(self, event: AbortReceived) -> None:
        for key in event.keys:
            self._abort_key(key)

    def _on_abort_all(self, _: AbortAllReceived) -> None:
        keys = {job.task.routing_key for job in self._held()}
        log.info("aborting every routing key held (%d)", len(keys))
        for key in keys:
            self._abort_key(key)

    def _on_drain(self, event: DrainRequested) -> None:
        if self.phase is not Phase.RUNNING:
            return
        self.phase = Phase.DRAINING
        self._out.append(SendCredit(0))
        reports = self._reports
        reports.extend((job, RETURNED) for job in self._queue)
        reports.extend((job, RETURNED) for job in self._waiting)
        self._queue.clear()
        self._waiting.clear()
        self._drain_at = self._clock() + event.grace

    def _on_drain_expired(self, _: DrainExpired) -> None:
        if self.phase is Phase.DRAINING:
            self._hand_back(self._clock())

    def _on_broken(self, _: StreamBroken) -> None:
        # The orchestrator re-queues whatever this stream held; a result
        # sent on a later stream would be a duplicate.
        self._dropped += len(self._queue) + len(self._running) + len(self._waiting)
        self._dropped += len(self._reports)
        self._reports = []
        self._cancel = list(self._running)  # let cooperative operations stop
        self._queue.clear()
        self._running.clear()
        self._deadlines.clear()
        self._waiting.clear()
        self._isolated = None
        self._drain_at = None
        self.phase = Phase.BROKEN

    # ---------------------------------------------------------- helpers

    def _held(self) -> Iterable[Job]:
        yield from self._queue
        yield from self._running
        yield from self._waiting

    def _pump(self) -> None:
        """Start queued jobs while slots are free."""
        queue = self._queue
        if not queue or self._isolated is not None or self.phase is not Phase.RUNNING:
            return
        capacity = self._capacity
        free = capacity - len(self._running) - len(self._detached) - self._occupied
        if free <= 0:
            return
        now = self._clock()
        running = self._running
        jobs: list[Job] = []
        while queue and free > 0:
            job = queue[0]
            if job.suspect:
                # Alone in the pool: if it crashes now, the crash is its own.
                if free < capacity:
                    break
                self._isolated = job
                free = 1
            queue.popleft()
            running[job] = now
            timeout = job.task.timeout_seconds
            if timeout > 0:
                self._deadlines[job] = now + timeout
            jobs.append(job)
            free -= 1
        if jobs:
            self._out.append(Run(jobs))

    def _retry(self, job: Job, transient: Transient) -> bool:
        """Handle a transient failure; True when the job should run again at once."""
        task = job.task
        if transient.delay is None:
            self._reports.append((job, Failure(
                ErrorKind.OPERATION, transient.error_type, transient.message,
                FatalStrategy.TERMINATE, retries_exhausted=True, retries=job.retries,
            )))
            return False
        if self.phase is not Phase.RUNNING:
            self._reports.append((job, RETURNED))
            return False
        if self._aborted.is_aborted(task.routing_key):
            self._reports.append((job, aborted_failure(task.routing_key)))
            return False
        job.retries += 1
        log.debug(
            "task %s/%d: %s, retry %d in %.3fs", task.routing_key, task.task_id,
            transient.message, job.retries, transient.delay,
        )
        if transient.delay <= 0:
            return True
        # Waiting holds no executor slot: other tasks run meanwhile.
        self._waiting[job] = self._clock() + transient.delay
        return False

    def _abort_key(self, key: str) -> None:
        self._aborted.remember(key)
        failure = aborted_failure(key)
        queue = self._queue
        if any(job.task.routing_key == key for job in queue):
            kept: deque[Job] = deque()
            for job in queue:
                if job.task.routing_key == key:
                    self._reports.append((job, failure))
                else:
                    kept.append(job)
            self._queue = kept
        for job in [j for j in self._waiting if j.task.routing_key == key]:
            del self._waiting[job]
            self._reports.append((job, failure))
        # Running jobs see their abort signal and report however they end.
        self._cancel.extend(j for j in self._running if j.task.routing_key == key)

    def _detach(self, job: Job, now: float) -> None:
        """``job`` is reported now, though its run goes on holding a slot."""
        job.elapsed += now - self._running.pop(job)
        self._detached.add(job)
        self._cancel.append(job)
        if job is self._isolated:
            self._isolated = None

    def _hand_back(self, now: float) -> None:
        self._drain_at = None
        if not self._running:
            return
        log.warning(
            "handing back %d task(s) still running at the drain deadline", len(self._running),
        )
        self._deadlines.clear()
        for job in list(self._running):
            self._detach(job, now)
            self._reports.append((job, RETURNED))

    def _stray(self, job: Job) -> None:
        """A run this session does not wait for ended: its slot is free again."""
        if job in self._detached:
            self._detached.remove(job)
        elif self._occupied > 0:
            self._occupied -= 1

    # --------------------------------------------------------- checking

    def validate(self) -> None:
        """Assert every invariant of the module docstring."""
        queue, running, waiting = self._queue, set(self._running), set(self._waiting)
        queued = set(queue)
        assert len(queued) == len(queue), "a job is twice in the FIFO"
        places = (queued, running, waiting, self._detached)
        assert sum(map(len, places)) == len(set().union(*places)), "a job is in two places"
        held = len(queue) + len(running) + len(waiting)
        assert self._received == held + self._reported + self._dropped, (
            f"received {self._received} != held {held} + reported {self._reported}"
            f" + dropped {self._dropped}"
        )
        taken = len(running) + len(self._detached) + self._occupied
        assert taken <= self._capacity, f"{taken} slots taken of {self._capacity}"
        assert set(self._deadlines) <= running, "a deadline for a job not running"
        assert all(j.task.timeout_seconds > 0 for j in self._deadlines)
        if self._isolated is not None:
            assert running == {self._isolated} and taken == 1, "a suspect does not run alone"
        if self.phase is not Phase.RUNNING:
            assert not queue and not waiting, f"tasks wait while {self.phase.value}"
        if self.phase in (Phase.CLOSED, Phase.BROKEN):
            assert not running, f"tasks run while {self.phase.value}"
            assert self._drain_at is None
        if self.phase is Phase.BROKEN:
            assert self._wake_at is None
