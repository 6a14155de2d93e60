"""Where tasks run: inline on the event loop, in threads, or in processes.

Every executor has the same face (``Executor``): ``submit`` takes a batch of
tasks, and each run comes back to the attached sink as an
``ExecutionFinished`` event -- during ``submit`` itself for the inline
executor (a whole batch in one event), later and in batches of whatever
ended together for the thread and process executors (``_process``). A
process child that dies reports the task it was running as a
``PoolCrashed``. So the scheduler never asks which executor it drives.

An executor's slots are taken at submit and freed when the run's event is
emitted -- not when a session stops caring about it -- so a task left
running by a broken stream session still counts against concurrency (a new
session learns it from ``busy``) until it really ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from squire_kernel.operations import AbortSignal, Registry
from worker_service._abort import NEVER_ABORTED, AbortFlag
from worker_service._depth import (
    STALL_CHECK,
    STALL_FACTOR,
    STALL_SECONDS,
    UNSEEN_SECONDS,
    learn,
    room,
)
from worker_service._execute import prepare, run_task
from worker_service._model import ErrorKind, Failure, Outcome, TaskSpec, aborted_failure
from worker_service._process import ProcessExecutor as ProcessExecutor
from worker_service._process import Sink as Sink
from worker_service._scheduler_events import Executed, ExecutionFinished

log = logging.getLogger("worker_service.executor")


class Executor(Protocol):
    """Runs batches of tasks; reports every run to the attached sink."""

    @property
    def capacity(self) -> int:
        """Tasks it runs at once."""

    @property
    def busy(self) -> int:
        """Slots taken now, by whichever session submitted their tasks."""

    def attach(self, sink: Sink | None) -> None:
        """Send the events of runs that end from now on to ``sink`` (None: drop them)."""

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        """Run each task once, with retry number ``task.retries + 1``."""

    def abort(self, tasks: Iterable[TaskSpec]) -> None:
        """Set the abort signal of these tasks, if they still run."""

    async def start(self) -> None: ...

    async def close(self, grace: float) -> None: ...


class InlineExecutor:
    """Runs a batch back to back on the event loop, for trivial operations.

    Nothing can set an abort signal while an inline task runs (the loop is
    busy running it), so operations get a signal that is never set. Its
    ``capacity`` only bounds how many tasks one batch holds.

    Consecutive tasks nearly always share kind, operation, params and
    serializer: such a run of tasks is prepared once (the registry lookup,
    the params, the serializer); per task only decode, call, encode remain.
    """

    def __init__(self, registry: Registry, capacity: int) -> None:
        self._registry = registry
        self._capacity = capacity
        self._sink: Sink | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def busy(self) -> int:
        return 0  # a batch has ended by the time anyone can ask

    def attach(self, sink: Sink | None) -> None:
        self._sink = sink

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        registry = self._registry
        clock = time.perf_counter
        results: list[Executed] = []
        append = results.append
        # The current run of tasks: its fields, and how its tasks run (or
        # the failure every one of them gets).
        run_operation: str | None = None
        run_kind = run_serializer = -1
        run_params = b""
        run: Callable[[bytes, Sequence[bytes], AbortSignal, int], Outcome] | None = None
        failure: Failure | None = None
        for t in tasks:
            if (t.operation != run_operation or t.kind != run_kind or t.params != run_params
                    or t.serializer != run_serializer):
                run_operation, run_kind, run_params, run_serializer = (
                    t.operation, t.kind, t.params, t.serializer
                )
                prepared = prepare(registry, t.kind, t.operation, t.params, t.serializer)
                if isinstance(prepared, Failure):
                    run, failure = None, prepared
                else:
                    run, failure = prepared.run, None
            if run is None:
                assert failure is not None  # set whenever run is not
                append((t, failure, 0.0))
                continue
            start = clock()
            outcome = run(t.input, t.operands, NEVER_ABORTED, t.retries + 1)
            append((t, outcome, clock() - start))
        if self._sink is not None:
            self._sink(ExecutionFinished(results))

    def abort(self, tasks: Iterable[TaskSpec]) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self, grace: float) -> None:
        return None


class ThreadExecutor:
    """Threads: for operations that release the GIL or wait on I/O.

    The pool's threads share one queue, which holds a short backlog beyond
    the tasks they run (``_depth``'s rule, as a process child's queue), so a
    thread takes its next task without a trip through the event loop. Runs
    that end are handed to the loop in batches: whatever ended since the
    loop last took them, with one ``call_soon_threadsafe`` and one
    ``ExecutionFinished``. A task whose abort signal is set before a thread
    takes it is not run.
    """

    def __init__(self, registry: Registry, concurrency: int) -> None:
        self._registry = registry
        self._concurrency = concurrency
        self._pool = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="squire-task"
        )
        self._flags: dict[TaskSpec, AbortFlag] = {}
        self._estimate_at: dict[TaskSpec, float] = {}
        self._backlog = 0.0
        self._estimates: dict[tuple[int, str], float] = {}
        self._yardstick: float | None = None
        self._sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        # (task, outcome, seconds, whether it ran), guarded by _lock
        self._ended: list[tuple[TaskSpec, Outcome, float, bool]] = []
        self._handoff_due = False  # guarded by _lock
        self._idle = asyncio.Event()
        self._idle.set()
        self._futures: dict[TaskSpec, concurrent.futures.Future[None]] = {}
        self._progress_at = 0.0  # when runs last ended, or the first of a batch was queued
        self._stall_check: asyncio.TimerHandle | None = None

    @property
    def capacity(self) -> int:
        held = len(self._flags)
        return max(1, held + room(held, self._backlog, self._yardstick, self._concurrency))

    @property
    def busy(self) -> int:
        return len(self._flags)

    def attach(self, sink: Sink | None) -> None:
        self._sink = sink

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        assert self._loop is not None, "start() the executor first"
        operations, flags, threads = self._registry.operations, self._flags, self._concurrency
        returned: Sequence[TaskSpec] = ()
        for at, task in enumerate(tasks):
            estimate = self._estimates.get((task.kind, task.operation))
            if not room(len(flags), self._backlog, estimate, threads):
                returned = tasks[at:]  # and nothing overtakes it
                break
            if not flags:
                self._progress_at = time.perf_counter()
            flag = flags[task] = AbortFlag()
            seconds = self._estimate_at[task] = UNSEEN_SECONDS if estimate is None else estimate
            self._backlog += seconds
            op = operations.get(task.operation)
            signal = flag if op is not None and op.accepts_abort else NEVER_ABORTED
            self._futures[task] = self._pool.submit(self._run, task, flag, signal)
        if flags:
            self._idle.clear()
        if len(flags) > threads and self._stall_check is None:
            self._stall_check = self._loop.call_later(STALL_CHECK, self._check_stalls)
        if returned and self._sink is not None:
            self._sink(ExecutionFinished((), len(flags), returned))

    def _run(self, task: TaskSpec, flag: AbortFlag, abort: AbortSignal) -> None:
        """In a pool thread: run ``task``, then queue its end for the loop."""
        start = time.perf_counter()
        ran = not flag.is_set()
        try:
            outcome = run_task(
                self._registry, task.kind, task.operation, task.params, task.input,
                task.operands, task.serializer, abort, task.retries + 1,
            ) if ran else aborted_failure(task.routing_key)
        except BaseException as exc:  # run_task turns what operations raise into failures
            log.error("executing task %s/%d failed", task.routing_key, task.task_id,
                      exc_info=exc)
            outcome = Failure(ErrorKind.OPERATION, type(exc).__name__, str(exc))
        ended = (task, outcome, time.perf_counter() - start, ran)
        with self._lock:
            self._ended.append(ended)
            if self._handoff_due:
                return
            self._handoff_due = True
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._handoff)
        except RuntimeError:  # the loop is closed: the worker is gone
            pass

    def _handoff(self) -> None:
        with self._lock:
            ended, self._ended = self._ended, []
            self._handoff_due = False
        estimates, yardstick = self._estimates, self._yardstick
        executed: list[Executed] = []
        self._progress_at = time.perf_counter()
        for task, outcome, seconds, ran in ended:
            del self._flags[task]
            del self._futures[task]
            self._backlog -= self._estimate_at.pop(task)
            if ran:
                key = (task.kind, task.operation)
                estimates[key] = learn(estimates.get(key), seconds)
                yardstick = learn(yardstick, seconds)
            executed.append((task, outcome, seconds))
        self._yardstick = yardstick
        if not self._flags:
            self._backlog = 0.0  # no drift from the sums
            self._idle.set()
        if self._sink is not None:
            self._sink(ExecutionFinished(executed, self.capacity))

    def _check_stalls(self) -> None:
        """Take back the queue behind runs much slower than estimated."""
        self._stall_check = None
        if len(self._flags) <= self._concurrency:
            return
        waited = time.perf_counter() - self._progress_at
        if waited > max(STALL_SECONDS, STALL_FACTOR * (self._yardstick or 0.0)):
            # A future not started yet cancels (then never runs); a running one does not.
            returned = [t for t, future in list(self._futures.items()) if future.cancel()]
            for task in returned:
                del self._flags[task], self._futures[task]
                self._backlog -= self._estimate_at.pop(task)
            for task in self._futures:  # running at least this long
                key = (task.kind, task.operation)
                self._estimates[key] = max(self._estimates.get(key, 0.0), waited)
            self._yardstick = max(self._yardstick or 0.0, waited)
            if returned:
                log.warning("threads have run for %.2fs: %d task(s) queued behind them go back "
                            "to the queue", waited, len(returned))
                if self._sink is not None:
                    self._sink(ExecutionFinished((), self.capacity, returned))
        if len(self._flags) > self._concurrency:
            assert self._loop is not None
            self._stall_check = self._loop.call_later(STALL_CHECK, self._check_stalls)

    def abort(self, tasks: Iterable[TaskSpec]) -> None:
        for task in tasks:
            flag = self._flags.get(task)
            if flag is not None:
                flag.set()

    async def close(self, grace: float) -> None:
        if self._stall_check is not None:
            self._stall_check.cancel()
        for flag in self._flags.values():
            flag.set()
        self._pool.shutdown(wait=False)
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            # Threads cannot be stopped from outside; interpreter exit waits
            # for them. Cooperative operations have seen their abort signal.
            log.warning(
                "%d operation(s) still running in threads after %.1fs; exit waits for them",
                self.busy, grace,
            )
