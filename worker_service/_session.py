"""One stream session: from the orchestrator's Welcome to the end of the stream.

A session owns every task it received and reports each exactly once on its
own stream (the credit invariant). A task is always in exactly one place --
the local FIFO, running in the executor, or waiting to retry -- and reporting
it takes it out of that place, which is what makes "exactly once" hold.
When the stream breaks, the session simply forgets what it holds: the
orchestrator re-queues those tasks, and their results must never be sent on
a later session.

Reading, writing and heartbeats are concurrent tasks in the session's
TaskGroup. All writes go through the single writer (a gRPC stream allows one
write at a time), which sends everything finished since its last write as one
ResultBatch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb

from squire_kernel.metrics import CounterChild, HistogramChild
from squire_kernel.operations import AbortSignal
from squire_kernel.retry import FatalStrategy
from worker_service import _wire
from worker_service._abort import NEVER_ABORTED, AbortMemory
from worker_service._executor import Executor, InlineExecutor, ProcessExecutor, Submitted
from worker_service._model import ErrorKind, Failure, Outcome, TaskSpec, Transient
from worker_service._probe import FIRST_EXECUTION_BUCKET, WorkerMetrics

log = logging.getLogger("worker_service.session")

# After the drain half-closes the stream, how long to wait for the
# orchestrator to end its side before cancelling the call.
CLOSE_TIMEOUT = 5.0

_STREAM_ERRORS = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


class SessionEnd(enum.Enum):
    BROKEN = "broken"    # the stream failed or the orchestrator ended it
    DRAINED = "drained"  # the drain finished and the stream was closed cleanly


class _Job:
    """A task held by the session, with what the worker learned running it."""

    __slots__ = ("elapsed", "retries", "suspect", "task")

    def __init__(self, task: TaskSpec) -> None:
        self.task = task
        self.retries = 0
        self.elapsed = 0.0
        # It ran in a process pool that broke under several tasks at once:
        # it runs again alone before anyone is blamed (see _await_pooled).
        self.suspect = False


def _aborted(key: str) -> Failure:
    return Failure(ErrorKind.ABORTED, "Aborted", f"routing key {key!r} was aborted")


_RETURNED = Failure(ErrorKind.RETURNED, "Returned", "the worker is draining")


def _context(task: TaskSpec) -> dict[str, object]:
    """Structured log fields of a task (see squire_kernel.logs)."""
    return {"routing_key": task.routing_key, "task_id": task.task_id, "operation": task.operation}


class Session:
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
    ) -> None:
        self._metrics = metrics
        self._call = call
        self._executor = executor
        self._aborted = aborted
        self._window = window
        self._heartbeat_interval = heartbeat_interval
        self._on_drain_request = on_drain_request

        self._queue: deque[_Job] = deque()
        self._running: dict[_Job, Submitted] = {}
        self._isolated: _Job | None = None  # a suspect running alone
        self._waiting: dict[_Job, asyncio.Task[None]] = {}
        self._outbox = _wire.ResultBuffer()

        self._tasks: set[asyncio.Task[Any]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._wake_writer = asyncio.Event()
        self._writer_done = asyncio.Event()
        self._drain_wakeup = asyncio.Event()
        self._ended = asyncio.Event()
        self._end: SessionEnd | None = None

        self._credit_zero_due = False
        self._heartbeat_due = False
        self._closing = False
        self._half_closed = False
        self._draining = False
        self._drain_expired = False
        self._warned_window = False
        self._pending_drain: float | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def buffered(self) -> int:
        return len(self._queue) + len(self._waiting)

    async def run(self) -> SessionEnd:
        executor = self._executor
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if not isinstance(executor, InlineExecutor):
                executor.on_slot_freed = self._pump
            self._spawn(self._read_loop())
            self._spawn(self._write_loop())
            self._spawn(self._heartbeat_loop())
            if self._pending_drain is not None:
                self.begin_drain(self._pending_drain)
            try:
                await self._ended.wait()
            finally:
                self._teardown()
        assert self._end is not None
        return self._end

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _finish(self, end: SessionEnd, why: str) -> None:
        if self._end is None:
            self._end = end
            log.log(
                logging.INFO if end is SessionEnd.DRAINED else logging.WARNING,
                "stream session ended (%s): %s", end.value, why,
            )
            self._ended.set()

    def _teardown(self) -> None:
        executor = self._executor
        if not isinstance(executor, InlineExecutor) and executor.on_slot_freed == self._pump:
            executor.on_slot_freed = None
        # Whatever still runs belongs to a stream that is gone (or was handed
        # back): let cooperative operations stop, and drop queued pool work.
        for sub in self._running.values():
            sub.abort()
            sub.future.cancel()
        for task in list(self._tasks):
            task.cancel()

    # -------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    if self._half_closed:
                        self._finish(SessionEnd.DRAINED, "closed after draining")
                    else:
                        self._finish(SessionEnd.BROKEN, "the orchestrator ended the stream")
                    return
                assert isinstance(message, pb.OrchestratorMessage)
                kind = message.WhichOneof("kind")
                if kind == "tasks":
                    self._on_tasks(message.tasks.tasks)
                elif kind == "ipc":
                    self._on_ipc(message.ipc)
                else:
                    log.warning("ignoring an unexpected %s message", kind)
        except _STREAM_ERRORS as exc:
            self._finish(SessionEnd.BROKEN, _describe(exc))

    def _on_tasks(self, tasks: Sequence[pb.Task]) -> None:
        aborted = self._aborted
        aborted.prune()
        executor = self._executor
        if isinstance(executor, InlineExecutor) and not self._draining and not self._queue:
            self._run_inline_batch(executor, tasks)
            return
        for task in _wire.tasks_from_wire(tasks):
            job = _Job(task)
            if self._draining:
                self._report(job, _RETURNED)
            elif aborted.is_aborted(task.routing_key):
                self._report(job, _aborted(task.routing_key))
            else:
                self._queue.append(job)
        if not self._warned_window:
            held = len(self._queue) + len(self._running) + len(self._waiting)
            if held > self._window:
                self._warned_window = True
                log.warning(
                    "the orchestrator sent more tasks than the credit window: "
                    "%d held, window %d", held, self._window,
                )
        self._pump()

    def _run_inline_batch(self, executor: InlineExecutor, tasks: Sequence[pb.Task]) -> None:
        """The inline executor's hot path: straight from the wire message to
        the result message, with no per-task objects unless a task needs
        more than one run and a report (an error, a retry, a timeout).

        Consecutive tasks nearly always share kind, operation, params and
        serializer. Such a run of tasks is prepared once (the registry
        lookup, the params, the serializer) and its metrics are updated
        once; what is left per task is decode, call, encode and the result.
        """
        aborted = self._aborted
        # Aborts arrive as IPC, which waits for the loop this batch holds: an
        # empty memory stays empty until the batch ends.
        check_aborted = bool(aborted)
        add_ok = self._outbox.add_ok
        metrics = self._metrics
        clock = time.perf_counter
        # The current run: its fields, how its tasks run (or the failure
        # every one of them gets), and its metrics. Its ok results are
        # counted once, and so are its executions that fall in the
        # histogram's first bucket, observed as their mean.
        run_operation: str | None = None
        run_kind = run_serializer = -1
        run_params = b""
        run: Callable[[bytes, Sequence[bytes], AbortSignal, int], Outcome] | None = None
        failure: Failure | None = None
        ok: CounterChild | None = None
        execution: HistogramChild | None = None
        ok_count = fast_count = 0
        fast_seconds = 0.0
        for t in tasks:
            key = t.routing_key
            if check_aborted and aborted.is_aborted(key):
                self._report(_Job(_wire.task_from_wire(t)), _aborted(key))
                continue
            operation = t.operation
            kind = t.kind
            params = t.params
            serializer = t.serializer
            if (operation != run_operation or kind != run_kind or params != run_params
                    or serializer != run_serializer):
                run_operation, run_kind, run_params, run_serializer = (
                    operation, kind, params, serializer
                )
                prepared = executor.prepare(kind, operation, params, serializer)
                if isinstance(prepared, Failure):
                    run, failure = None, prepared
                else:
                    run, failure = prepared.run, None
                if metrics is not None:
                    if ok_count:
                        _count_oks(ok, execution, ok_count, fast_count, fast_seconds)
                        ok_count = fast_count = 0
                        fast_seconds = 0.0
                    _, ok, execution = metrics.series(operation, kind)
            if run is not None:
                start = clock()
                # Only a combine (a non-zero kind that prepare accepted) reads
                # its operands: an empty repeated field still costs an object.
                # Nothing can abort an inline run.
                outcome = run(t.input, t.operands if kind else (), NEVER_ABORTED, 1)
                took = clock() - start
                if type(outcome) is bytes and not 0 < t.timeout_seconds < took:
                    add_ok(key, t.task_id, t.attempt, t.lease_id, t.metadata, outcome, took)
                    if execution is not None:
                        ok_count += 1
                        if took <= FIRST_EXECUTION_BUCKET:
                            fast_count += 1
                            fast_seconds += took
                        else:
                            execution.observe(took)
                    continue
            else:
                assert failure is not None  # set whenever run is not
                outcome, took = failure, 0.0
            job = _Job(_wire.task_from_wire(t))
            job.elapsed = took
            if self._settle_inline(job, outcome, took):
                self._run_inline(executor, job)
        if ok_count:
            _count_oks(ok, execution, ok_count, fast_count, fast_seconds)
        self._wake_writer.set()

    def _on_ipc(self, ipc: pb.WorkerIpc) -> None:
        kind = ipc.WhichOneof("kind")
        if kind == "execution_failed":
            log.info(
                "routing key %s failed: %s", ipc.execution_failed.routing_key,
                ipc.execution_failed.message,
            )
            self._abort_key(ipc.execution_failed.routing_key)
        elif kind == "abort":
            log.info(
                "routing key %s aborted", ipc.abort.routing_key,
                extra={"routing_key": ipc.abort.routing_key},
            )
            self._abort_key(ipc.abort.routing_key)
        elif kind == "abort_all":
            keys = {job.task.routing_key for job in self._held()}
            log.info("aborting every routing key held (%d)", len(keys))
            for key in keys:
                self._abort_key(key)
        elif kind == "drain":
            grace = ipc.drain.grace_seconds
            self._on_drain_request(grace if grace > 0 else None)
        else:
            log.warning("ignoring an unknown worker IPC message")

    def _held(self) -> Iterable[_Job]:
        yield from self._queue
        yield from self._running
        yield from self._waiting

    def _abort_key(self, key: str) -> None:
        self._aborted.remember(key)
        if any(job.task.routing_key == key for job in self._queue):
            kept: deque[_Job] = deque()
            for job in self._queue:
                if job.task.routing_key == key:
                    self._report(job, _aborted(key))
                else:
                    kept.append(job)
            self._queue = kept
        for job in [j for j in self._waiting if j.task.routing_key == key]:
            self._waiting.pop(job).cancel()
            self._report(job, _aborted(key))
        # Running tasks see their abort signal and report however they end.
        for job, sub in self._running.items():
            if job.task.routing_key == key:
                sub.abort()

    # ------------------------------------------------------------ executing

    def _pump(self) -> None:
        """Start queued tasks while the executor has room."""
        if self._ended.is_set():
            return
        queue = self._queue
        executor = self._executor
        if isinstance(executor, InlineExecutor):
            # Back to back, without yielding: that is the point of inline.
            while queue:
                self._run_inline(executor, queue.popleft())
            return
        while queue and executor.free_slots and self._isolated is None:
            job = queue[0]
            if job.suspect:
                # Alone in the pool: if it crashes now, the crash is its own.
                if executor.free_slots < executor.concurrency:
                    return
                self._isolated = job
            queue.popleft()
            sub = executor.submit(job.task, job.retries + 1)
            self._running[job] = sub
            self._spawn(self._await_pooled(job, sub))

    def _run_inline(self, executor: InlineExecutor, job: _Job) -> None:
        task = job.task
        while True:
            start = time.perf_counter()
            outcome = executor.run(task, job.retries + 1)
            took = time.perf_counter() - start
            job.elapsed += took
            if not self._settle_inline(job, outcome, took):
                return

    def _settle_inline(self, job: _Job, outcome: Outcome, took: float) -> bool:
        """Report an inline run's outcome; True when the task must run again now."""
        task = job.task
        if 0 < task.timeout_seconds < took:
            outcome = _timed_out(task)
        if not isinstance(outcome, Transient):
            self._report(job, outcome)
            return False
        return self._retry_now(job, outcome)

    async def _await_pooled(self, job: _Job, sub: Submitted) -> None:
        task = job.task
        start = time.perf_counter()
        outcome: Outcome
        try:
            if task.timeout_seconds > 0:
                # wait() leaves the future alone on timeout: the pool slot
                # stays taken until the operation really stops.
                await asyncio.wait((sub.future,), timeout=task.timeout_seconds)
                if not sub.future.done():
                    sub.abort()
                    job.elapsed += time.perf_counter() - start
                    if self._running.pop(job, None) is not None:
                        self._report(job, _timed_out(task))
                        self._left_pool(job)
                    return
            outcome = await sub.future
        except concurrent.futures.BrokenExecutor as exc:
            # Every task of a broken pool lands here, not just the culprit.
            # Blaming them all would let a poison task take innocent tasks,
            # even of other directives, down with it: when several ran, each
            # runs again alone and only a crash there is reported.
            executor = self._executor
            if isinstance(executor, ProcessExecutor):
                executor.replace_broken(sub.pool)
            if not job.suspect and not isinstance(executor, InlineExecutor) \
                    and executor.crash_shared(sub.pool):
                log.warning(
                    "task %s/%d (%s) shared a process pool that broke; running it again alone",
                    task.routing_key, task.task_id, task.operation, extra=_context(task),
                )
                if self._running.pop(job, None) is not None:
                    self._rerun_alone(job)
                    self._left_pool(job)
                return
            log.error(
                "task %s/%d (%s) lost: an executor process died",
                task.routing_key, task.task_id, task.operation, extra=_context(task),
            )
            outcome = Failure(
                ErrorKind.CRASHED, type(exc).__name__,
                "the executor process died while running the task",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception(
                "executing task %s/%d failed", task.routing_key, task.task_id,
                extra=_context(task),
            )
            outcome = Failure(ErrorKind.OPERATION, type(exc).__name__, str(exc))
        job.elapsed += time.perf_counter() - start
        if self._running.pop(job, None) is None:
            return  # handed back at the drain deadline: reported already
        if isinstance(outcome, Transient):
            if self._retry_now(job, outcome):
                self._queue.appendleft(job)
                self._pump()
        else:
            self._report(job, outcome)
        self._left_pool(job)

    def _rerun_alone(self, job: _Job) -> None:
        job.suspect = True
        key = job.task.routing_key
        if self._draining:
            self._report(job, _RETURNED)
        elif self._aborted.is_aborted(key):
            self._report(job, _aborted(key))
        else:
            self._queue.appendleft(job)
            self._pump()

    def _left_pool(self, job: _Job) -> None:
        """``job`` no longer runs: end its isolation, start what waited."""
        if self._isolated is job:
            self._isolated = None
            self._pump()
        self._running_changed()

    def _retry_now(self, job: _Job, transient: Transient) -> bool:
        """Handle a transient failure; True when the task should run again at once."""
        task = job.task
        if transient.delay is None:
            self._report(job, Failure(
                ErrorKind.OPERATION, transient.error_type, transient.message,
                FatalStrategy.TERMINATE, retries_exhausted=True, retries=job.retries,
            ))
            return False
        if self._draining:
            self._report(job, _RETURNED)
            return False
        if self._aborted.is_aborted(task.routing_key):
            self._report(job, _aborted(task.routing_key))
            return False
        job.retries += 1
        log.debug(
            "task %s/%d: %s, retry %d in %.3fs", task.routing_key, task.task_id,
            transient.message, job.retries, transient.delay,
        )
        if transient.delay <= 0:
            return True
        self._waiting[job] = self._spawn(self._retry_later(job, transient.delay))
        return False

    async def _retry_later(self, job: _Job, delay: float) -> None:
        # Waiting here holds no executor slot: other tasks run meanwhile.
        await asyncio.sleep(delay)
        if self._waiting.pop(job, None) is None:
            return
        if self._aborted.is_aborted(job.task.routing_key):
            self._report(job, _aborted(job.task.routing_key))
            return
        self._queue.appendleft(job)
        self._pump()

    def _running_changed(self) -> None:
        if not self._running:
            self._drain_wakeup.set()

    # -------------------------------------------------------------- writing

    def _report(self, job: _Job, outcome: bytes | Failure) -> None:
        task = job.task
        self._outbox.add(task, outcome, job.elapsed, job.retries)
        if self._metrics is not None:
            self._metrics.record(task.operation, task.kind, outcome, job.elapsed, job.retries)
        self._wake_writer.set()

    async def _write_loop(self) -> None:
        call = self._call
        try:
            while True:
                await self._wake_writer.wait()
                self._wake_writer.clear()
                if self._credit_zero_due:
                    self._credit_zero_due = False
                    await call.write(_wire.credit(0))
                while self._outbox:
                    for message in self._outbox.take():
                        await call.write(message)
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    await call.write(_wire.heartbeat(self.running, self.buffered))
                if self._closing and not self._outbox:
                    self._writer_done.set()
                    return
        except _STREAM_ERRORS as exc:
            self._finish(SessionEnd.BROKEN, _describe(exc))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            self._heartbeat_due = True
            self._wake_writer.set()

    # ------------------------------------------------------------- draining

    def begin_drain(self, grace: float) -> None:
        """Take nothing new, hand back what has not started, finish the rest."""
        if self._draining or self._ended.is_set():
            return
        if self._tg is None:  # asked before run() started its tasks
            self._pending_drain = grace
            return
        self._draining = True
        self._credit_zero_due = True
        for job in self._queue:
            self._report(job, _RETURNED)
        self._queue.clear()
        for job, timer in self._waiting.items():
            timer.cancel()
            self._report(job, _RETURNED)
        self._waiting.clear()
        self._wake_writer.set()
        self._spawn(self._finish_drain(grace))

    def expire_drain(self) -> None:
        """Cut the drain grace short: hand back what still runs now."""
        self._drain_expired = True
        self._drain_wakeup.set()

    async def _finish_drain(self, grace: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace
        while self._running and not self._drain_expired:
            self._drain_wakeup.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._drain_wakeup.wait()
            except TimeoutError:
                break
        if self._running:
            log.warning(
                "handing back %d task(s) still running at the drain deadline",
                len(self._running),
            )
            for job, sub in self._running.items():
                sub.abort()
                self._report(job, _RETURNED)
            self._running.clear()
            self._isolated = None
        self._closing = True
        self._wake_writer.set()
        await self._writer_done.wait()
        try:
            await self._call.done_writing()
        except _STREAM_ERRORS as exc:
            self._finish(SessionEnd.BROKEN, _describe(exc))
            return
        self._half_closed = True
        # The reader ends the session when the orchestrator closes its side.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._ended.wait()
        except TimeoutError:
            self._finish(SessionEnd.DRAINED, "the orchestrator did not close its side in time")


def _count_oks(
    ok: CounterChild | None,
    execution: HistogramChild | None,
    ok_count: int,
    fast_count: int,
    fast_seconds: float,
) -> None:
    """Add a run's ok results to its metrics: ``fast_count`` of them, taking
    ``fast_seconds`` in all, were in the first bucket and not observed yet."""
    assert ok is not None and execution is not None
    ok.value += ok_count
    if fast_count:
        # The mean of values in the first bucket is in it too: one
        # observation of it ``fast_count`` times gives the same count and sum.
        execution.observe(fast_seconds / fast_count, fast_count)


def _timed_out(task: TaskSpec) -> Failure:
    return Failure(
        ErrorKind.TIMEOUT, "TimeoutError", f"ran longer than {task.timeout_seconds:g}s",
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
