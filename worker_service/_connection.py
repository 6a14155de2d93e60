"""One connection to the orchestrator: from its Welcome to the end of the stream.

The connection only does I/O. Its reader turns stream messages into scheduler
events, the executor's completions come back as events too, and the
session carries out the instructions the ``Scheduler`` returns: hand a
batch to the executor, put results in the outbox, arm the wake-up timer,
signal aborts, close the stream. Every rule about tasks (exactly once,
capacity, retries, drain) lives in the scheduler (``_scheduler``).

Reading, writing and heartbeats are concurrent tasks in the session's
TaskGroup. All writes go through the single writer (a gRPC stream allows one
write at a time), which sends everything reported since its last write as
one ResultBatch.

A connection starts from what the one before it left (``Carry``): the tasks
that ran on when that stream broke, its results not yet written, and what
the executor finished in between. It sends those results first; its hello
named them all, so the orchestrator leased them back (see ``_adopt`` there).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb

from worker_service import _wire
from worker_service._abort import AbortMemory
from worker_service._executor import Executor
from worker_service._probe import WorkerMetrics
from worker_service._scheduler import Scheduler
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

log = logging.getLogger("worker_service.session")

# After the drain half-closes the stream, how long to wait for the
# orchestrator to end its side before cancelling the call.
CLOSE_TIMEOUT = 5.0

# Results written this recently (at most this many) when the stream breaks
# may never have reached the orchestrator (a written message is only in a
# socket buffer): the next stream sends them again. One the orchestrator had
# is a duplicate there, dropped by its lease; one it lost is adopted.
RESEND_SECONDS = 2.0
RESEND_MAX = 10_000

_STREAM_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


@dataclass(slots=True)
class Carry:
    """What one stream leaves to the next: the scheduler's holdover, results
    the old stream had reported but not written, and executor completions
    that arrived while no stream was up."""

    holdover: Holdover = field(default_factory=Holdover)
    unsent: list[Report] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.holdover or self.unsent or self.events)

    def held(self) -> list[pb.HeldTask]:
        """The tasks to name in the next hello."""
        tasks = [*self.holdover.running, *(t for t, _ in self.holdover.reports)]
        tasks += [t for t, _ in self.unsent]
        return _wire.held(tasks)


class ConnectionEnd(enum.Enum):
    BROKEN = "broken"    # the stream failed or the orchestrator ended it
    DRAINED = "drained"  # the drain finished and the stream was closed cleanly


class Connection:
    def __init__(
        self,
        call: grpc.aio.StreamStreamCall,
        *,
        executor: Executor,
        aborted: AbortMemory,
        window: int,
        heartbeat_interval: float,
        on_drain_request: Callable[[float | None], None],
        metrics: WorkerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        carry: Carry | None = None,
    ) -> None:
        self._metrics = metrics
        self._carry_in = carry if carry is not None else Carry()
        # What this stream leaves to the next, filled when it ends.
        self.carry = Carry()
        self._call = call
        self._executor = executor
        self._aborted = aborted
        self._window = window
        self._heartbeat_interval = heartbeat_interval
        self._on_drain_request = on_drain_request
        self._clock = clock

        self._scheduler: Scheduler | None = None  # made when run() starts
        self._pending: list[Event] = []  # events that arrived while handling others
        self._handling = False
        self._timer: asyncio.TimerHandle | None = None
        self._outbox = _wire.ResultBuffer()
        # Reports in the outbox, and those of the messages being written:
        # if the stream breaks before they are written, they are carried.
        self._outbox_reports: list[Report] = []
        self._writing_reports: list[Report] = []
        # Batches written lately: (when, reports), oldest first (see RESEND_SECONDS).
        self._written: deque[tuple[float, list[Report]]] = deque()
        self._written_count = 0

        self._tasks: set[asyncio.Task[Any]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._wake_writer = asyncio.Event()
        self._writer_done = asyncio.Event()
        self._ended = asyncio.Event()
        self._end: ConnectionEnd | None = None
        self._error: BaseException | None = None

        self._credit_due: int | None = None
        self._heartbeat_due = False
        self._closing = False
        self._half_closed = False
        self._pending_drain: float | None = None
        self._pending_expiry = False

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> int:
        return 0 if self._scheduler is None else self._scheduler.running

    @property
    def buffered(self) -> int:
        return 0 if self._scheduler is None else self._scheduler.buffered

    async def run(self) -> ConnectionEnd:
        executor = self._executor
        carry, self._carry_in = self._carry_in, Carry()
        holdover = carry.holdover
        # Made and attached in one step: no run can end in between, so the
        # slots held by earlier sessions' tasks are counted exactly once.
        self._scheduler = Scheduler(
            SchedulerConfig(executor.capacity, self._window), self._clock, self._aborted,
            occupied=max(executor.busy - len(holdover.running) - len(holdover.detached), 0),
            holdover=holdover,
        )
        executor.attach(self._feed_from_callback)
        if carry.unsent:  # reported by the last stream's scheduler already
            self._outbox.add(carry.unsent)
            self._outbox_reports.extend(carry.unsent)
        # The carried reports and what finished between the streams.
        self._feed(*carry.events)
        if self._outbox:
            self._wake_writer.set()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._spawn(self._read_loop())
                self._spawn(self._write_loop())
                self._spawn(self._heartbeat_loop())
                if self._pending_drain is not None:
                    self.begin_drain(self._pending_drain)
                    if self._pending_expiry:
                        self.expire_drain()
                try:
                    await self._ended.wait()
                finally:
                    self._teardown()
        finally:
            # Completions from now on belong to the next stream.
            executor.attach(self.carry.events.append)
        if self._error is not None:
            raise self._error
        assert self._end is not None
        return self._end

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _finish(self, end: ConnectionEnd, why: str) -> None:
        if self._end is None:
            self._end = end
            log.log(
                logging.INFO if end is ConnectionEnd.DRAINED else logging.WARNING,
                "stream session ended (%s): %s", end.value, why,
            )
            self._ended.set()

    def _teardown(self) -> None:
        # Whatever still runs goes on for the next stream (a drained one has
        # nothing left), with the reports that were not written.
        self._feed(StreamBroken())
        assert self._scheduler is not None
        carry = self.carry
        if self._scheduler.holdover is not None:
            carry.holdover = self._scheduler.holdover
        if self._end is ConnectionEnd.BROKEN:  # a drained stream delivered all it wrote
            carry.unsent = [r for _, batch in self._written for r in batch]
        carry.unsent += self._writing_reports + self._outbox_reports
        self._written.clear()
        self._written_count = 0
        self._writing_reports, self._outbox_reports = [], []
        self._executor.attach(carry.events.append)
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()

    # --------------------------------------------------- events, instructions

    def _feed(self, *events: Event) -> None:
        """Hand ``events`` to the scheduler and carry out its instructions.

        Carrying them out may produce events (an inline batch finishes
        within ``submit``); those are handled in the same loop, after the
        instructions of the current step, never re-entrantly.
        """
        scheduler = self._scheduler
        assert scheduler is not None
        if self._handling:
            self._pending.extend(events)
            return
        self._handling = True
        try:
            instructions = scheduler.handle(*events)
            while True:
                for instruction in instructions:
                    self._execute(instruction)
                if not self._pending:
                    return
                events, self._pending = tuple(self._pending), []
                instructions = scheduler.handle(*events)
        finally:
            self._handling = False
            self._pending.clear()

    def _feed_from_callback(self, event: Event) -> None:
        """Feed an event from a loop callback, where an exception has no owner:
        it ends the session, and run() raises it."""
        if self._end is not None:
            if isinstance(event, ExecutionFinished | PoolCrashed):
                self.carry.events.append(event)  # the next stream reports it
            return
        try:
            self._feed(event)
        except Exception as exc:
            self._error = exc
            self._finish(ConnectionEnd.BROKEN, f"scheduling failed: {exc!r}")

    def _tick(self) -> None:
        self._timer = None
        self._feed_from_callback(Tick())

    def _execute(self, instruction: Instruction) -> None:
        match instruction:
            case Run(tasks):
                self._executor.submit(tasks)
            case SendResults(results):
                self._outbox.add(results)
                self._outbox_reports.extend(results)
                if self._metrics is not None:
                    self._metrics.record_results(results)
                self._wake_writer.set()
            case CancelRunning(tasks):
                self._executor.abort(tasks)
            case Wake(at):
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if at is not None:
                    delay = max(0.0, at - self._clock())
                    self._timer = asyncio.get_running_loop().call_later(delay, self._tick)
            case SendCredit(window):
                self._credit_due = window
                self._wake_writer.set()
            case CloseStream():
                self._closing = True
                self._wake_writer.set()
                self._spawn(self._close())

    # -------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    if self._half_closed:
                        self._finish(ConnectionEnd.DRAINED, "closed after draining")
                    else:
                        self._finish(ConnectionEnd.BROKEN, "the orchestrator ended the stream")
                    return
                assert isinstance(message, pb.OrchestratorMessage)
                kind = message.WhichOneof("kind")
                if kind == "tasks":
                    self._feed(TasksReceived(_wire.tasks_from_wire(message.tasks.tasks)))
                elif kind == "ipc":
                    self._on_ipc(message.ipc)
                else:
                    log.warning("ignoring an unexpected %s message", kind)
        except _STREAM_ERRORS as exc:
            self._finish(ConnectionEnd.BROKEN, _describe(exc))

    def _on_ipc(self, ipc: pb.WorkerIpc) -> None:
        kind = ipc.WhichOneof("kind")
        if kind == "execution_failed":
            key = ipc.execution_failed.routing_key
            log.info("routing key %s failed: %s", key, ipc.execution_failed.message)
            self._feed(AbortReceived((key,)))
        elif kind == "abort":
            key = ipc.abort.routing_key
            log.info("routing key %s aborted", key, extra={"routing_key": key})
            self._feed(AbortReceived((key,)))
        elif kind == "abort_all":
            self._feed(AbortAllReceived())
        elif kind == "drain":
            grace = ipc.drain.grace_seconds
            self._on_drain_request(grace if grace > 0 else None)
        else:
            log.warning("ignoring an unknown worker IPC message")

    # -------------------------------------------------------------- writing

    async def _write_loop(self) -> None:
        call = self._call
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                if self._credit_due is not None:
                    window, self._credit_due = self._credit_due, None
                    await call.write(_wire.credit(window))
                while self._outbox:
                    self._writing_reports = self._outbox_reports
                    self._outbox_reports = []
                    for message in self._outbox.take():
                        await call.write(message)
                    self._remember_written(self._writing_reports)
                    self._writing_reports = []
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    await call.write(_wire.heartbeat(self.running, self.buffered))
                if self._closing and not self._outbox:
                    self._writer_done.set()
                    return
        except _STREAM_ERRORS as exc:
            self._finish(ConnectionEnd.BROKEN, _describe(exc))

    def _remember_written(self, reports: list[Report]) -> None:
        if not reports:
            return
        written = self._written
        now = self._clock()
        written.append((now, reports))
        self._written_count += len(reports)
        while written and (now - written[0][0] > RESEND_SECONDS
                           or self._written_count - len(written[0][1]) >= RESEND_MAX):
            self._written_count -= len(written.popleft()[1])

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            self._heartbeat_due = True
            self._wake_writer.set()

    # ------------------------------------------------------------- draining

    def begin_drain(self, grace: float) -> None:
        """Take nothing new, hand back what has not started, finish the rest."""
        if self._ended.is_set():
            return
        if self._tg is None:  # asked before run() started its tasks
            self._pending_drain = grace
            return
        self._feed(DrainRequested(grace))

    def expire_drain(self) -> None:
        """Cut the drain grace short: hand back what still runs now."""
        if self._ended.is_set():
            return
        if self._tg is None:
            self._pending_expiry = True
            return
        self._feed(DrainExpired())

    async def _close(self) -> None:
        await self._writer_done.wait()
        try:
            await self._call.done_writing()
        except _STREAM_ERRORS as exc:
            self._finish(ConnectionEnd.BROKEN, _describe(exc))
            return
        self._half_closed = True
        # The reader ends the session when the orchestrator closes its side.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._ended.wait()
        except TimeoutError:
            self._finish(ConnectionEnd.DRAINED, "the orchestrator did not close its side in time")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
