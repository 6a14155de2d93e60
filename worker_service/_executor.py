"""Where tasks run: inline on the event loop, in threads, or in processes.

Every executor has the same face (``Executor``): ``submit`` takes a batch of
tasks, and each run comes back to the attached sink as an
``ExecutionFinished`` event -- during ``submit`` itself for the inline
executor (a whole batch in one event), later and one by one for a pool. A
pool that breaks reports its tasks together as one ``PoolCrashed``. So the
scheduler never asks which executor it drives.

A pool's ``capacity`` slots are taken at submit and freed when the run's
event is emitted -- not when a session stops caring about it -- so a task
left running by a broken stream session still counts against concurrency
(a new session learns it from ``busy``) until it really ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from squire_kernel.operations import AbortSignal, Registry
from worker_service import _child
from worker_service._abort import NEVER_ABORTED, AbortFlag
from worker_service._errors import OpsLoadError
from worker_service._execute import prepare, run_task
from worker_service._model import ErrorKind, Failure, Outcome, TaskSpec
from worker_service._scheduler_events import Executed, ExecutionFinished, PoolCrashed

log = logging.getLogger("worker_service.executor")

Sink = Callable[[ExecutionFinished | PoolCrashed], None]


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


class _Run:
    """A task occupying a pool slot."""

    __slots__ = ("cf", "pool", "slot", "start")

    def __init__(
        self, cf: concurrent.futures.Future[Outcome], pool: concurrent.futures.Executor,
        slot: int, start: float,
    ) -> None:
        self.cf = cf
        self.pool = pool
        self.slot = slot
        self.start = start  # taken before the submit: the run may begin at once


class _PoolExecutor:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._free = list(range(concurrency))
        self._all_free = asyncio.Event()
        self._all_free.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Sink | None = None
        self._runs: dict[TaskSpec, _Run] = {}
        # A broken pool -> the error and the tasks that reported its crash so
        # far; it is reported once all its tasks have.
        self._crashes: dict[
            concurrent.futures.Executor, tuple[str, list[tuple[TaskSpec, _Run]]]
        ] = {}

    @property
    def capacity(self) -> int:
        return self.concurrency

    @property
    def busy(self) -> int:
        return self.concurrency - len(self._free)

    def attach(self, sink: Sink | None) -> None:
        self._sink = sink

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        loop = self._loop
        assert loop is not None, "start() the executor first"
        for task in tasks:
            assert self._free, "submitted beyond capacity"
            slot = self._free.pop()
            self._all_free.clear()
            start = time.perf_counter()
            cf, pool = self._start(task, slot)
            self._runs[task] = _Run(cf, pool, slot, start)
            cf.add_done_callback(self._when_done(loop, task))

    def _when_done(
        self, loop: asyncio.AbstractEventLoop, task: TaskSpec
    ) -> Callable[[concurrent.futures.Future[Outcome]], None]:
        def done(_: concurrent.futures.Future[Outcome]) -> None:
            try:  # called in the pool's thread
                loop.call_soon_threadsafe(self._finished, task)
            except RuntimeError:  # the loop is closed: the worker is gone
                pass

        return done

    def _start(
        self, task: TaskSpec, slot: int
    ) -> tuple[concurrent.futures.Future[Outcome], concurrent.futures.Executor]:
        raise NotImplementedError

    def _set_abort(self, slot: int) -> None:
        raise NotImplementedError

    def _pool_broke(self, pool: concurrent.futures.Executor) -> None:
        return None

    def abort(self, tasks: Iterable[TaskSpec]) -> None:
        for task in tasks:
            run = self._runs.get(task)
            # Once the future is done its slot may soon serve another task;
            # setting the flag then would abort that one instead.
            if run is not None and not run.cf.done():
                self._set_abort(run.slot)

    def _finished(self, task: TaskSpec) -> None:
        run = self._runs.pop(task)
        cf, pool = run.cf, run.pool
        error = None if cf.cancelled() else cf.exception()
        if isinstance(error, concurrent.futures.BrokenExecutor) or (
            cf.cancelled() and pool in self._crashes
        ):
            # A broken pool fails all its futures at once; its crash is
            # reported when the last of its runs is in, with all its tasks.
            self._pool_broke(pool)
            self._crashes.setdefault(pool, (type(error).__name__, []))[1].append((task, run))
        else:
            outcome: Outcome
            if cf.cancelled():
                outcome = Failure(ErrorKind.OPERATION, "CancelledError", "the executor closed")
            elif error is not None:
                log.error(
                    "executing task %s/%d failed", task.routing_key, task.task_id,
                    exc_info=error,
                )
                outcome = Failure(ErrorKind.OPERATION, type(error).__name__, str(error))
            else:
                outcome = cf.result()
            self._release(run.slot)
            self._emit(ExecutionFinished([(task, outcome, time.perf_counter() - run.start)]))
        # A run that ended well just before its pool broke may be the last in.
        if pool in self._crashes and not any(r.pool is pool for r in self._runs.values()):
            error_type, crashed = self._crashes.pop(pool)
            now = time.perf_counter()
            for _, crashed_run in crashed:
                self._release(crashed_run.slot)
            self._emit(PoolCrashed(
                [(t, now - r.start) for t, r in crashed], len(crashed) > 1, error_type,
            ))

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        if len(self._free) == self.concurrency:
            self._all_free.set()

    def _emit(self, event: ExecutionFinished | PoolCrashed) -> None:
        if self._sink is not None:
            self._sink(event)

    async def _wait_idle(self, grace: float) -> bool:
        try:
            async with asyncio.timeout(grace):
                await self._all_free.wait()
        except TimeoutError:
            return False
        return True


class ThreadExecutor(_PoolExecutor):
    """A ThreadPoolExecutor: for operations that release the GIL or wait on I/O."""

    def __init__(self, registry: Registry, concurrency: int) -> None:
        super().__init__(concurrency)
        self._registry = registry
        self._pool = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="squire-task"
        )
        self._flags: dict[int, AbortFlag] = {}

    def _start(
        self, task: TaskSpec, slot: int
    ) -> tuple[concurrent.futures.Future[Outcome], concurrent.futures.Executor]:
        op = self._registry.operations.get(task.operation)
        flag = self._flags[slot] = AbortFlag()
        cf = self._pool.submit(
            run_task, self._registry, task.kind, task.operation, task.params, task.input,
            task.operands, task.serializer,
            flag if op is not None and op.accepts_abort else NEVER_ABORTED, task.retries + 1,
        )
        return cf, self._pool

    def _set_abort(self, slot: int) -> None:
        self._flags[slot].set()

    async def close(self, grace: float) -> None:
        for flag in self._flags.values():
            flag.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not await self._wait_idle(grace):
            # Threads cannot be stopped from outside; interpreter exit waits
            # for them. Cooperative operations have seen their abort signal.
            log.warning(
                "%d operation(s) still running in threads after %.1fs; exit waits for them",
                self.busy, grace,
            )


class ProcessExecutor(_PoolExecutor):
    """A ProcessPoolExecutor of spawned children that import the ops modules."""

    def __init__(self, modules: Sequence[str], concurrency: int) -> None:
        super().__init__(concurrency)
        self._modules = tuple(modules)
        # spawn, not fork: forking a process that runs gRPC threads is unsafe.
        self._context = multiprocessing.get_context("spawn")
        # One abort flag per slot, in shared memory the children inherit.
        self._flags = self._context.RawArray("b", concurrency)
        # Each pool's process table, kept past shutdown() (which drops the
        # pool's own reference to it): the only handle on its children.
        self._children: weakref.WeakKeyDictionary[
            concurrent.futures.ProcessPoolExecutor, MutableMapping[int, Any]
        ] = weakref.WeakKeyDictionary()
        self._closing = False
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(
            self.concurrency,
            mp_context=self._context,
            initializer=_child.init_child,
            initargs=(self._modules, self._flags),
        )
        # The pool adds each child it spawns to this very dict.
        self._children[pool] = pool._processes
        return pool

    async def start(self) -> None:
        """Spawn every child now and check it can import the ops modules.

        Spawning takes a while; doing it before the hello keeps that latency
        off the first tasks and turns an import failure into a start-up error.
        """
        await super().start()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(
                *(loop.run_in_executor(self._pool, _child.offered) for _ in range(self.concurrency))
            )
        except BrokenProcessPool as exc:
            self._pool.shutdown(wait=False)
            raise OpsLoadError(
                f"process executor children cannot import the ops modules "
                f"{', '.join(self._modules)} (see the traceback above)"
            ) from exc

    def _start(
        self, task: TaskSpec, slot: int
    ) -> tuple[concurrent.futures.Future[Outcome], concurrent.futures.Executor]:
        self._flags[slot] = 0
        args = (
            task.kind, task.operation, task.params, task.input, task.operands,
            task.serializer, slot, task.retries + 1,
        )
        try:
            cf = self._pool.submit(_child.run_in_child, *args)
        except BrokenProcessPool:
            # The pool broke since the last task finished; its tasks were
            # reported already, so start afresh.
            self._pool_broke(self._pool)
            cf = self._pool.submit(_child.run_in_child, *args)
        return cf, self._pool

    def _set_abort(self, slot: int) -> None:
        self._flags[slot] = 1

    def _pool_broke(self, pool: concurrent.futures.Executor) -> None:
        """Replace ``pool`` after a child died; idempotent per pool."""
        if pool is not self._pool:
            return
        log.error("a process-pool child died; starting a new pool")
        self._pool.shutdown(wait=False, cancel_futures=True)
        # Every future of the broken pool has failed, so nothing its other
        # children still run can be reported: kill them now. Left alone they
        # would hold CPU beyond the concurrency limit, and the pool's own
        # clean-up (SIGTERM, which children ignore, then join) would wait for
        # them -- at interpreter exit, forever if one never finishes.
        self._kill_children(self._pool)
        if not self._closing:
            self._pool = self._new_pool()

    async def close(self, grace: float) -> None:
        self._closing = True
        for slot in range(self.concurrency):
            self._flags[slot] = 1
        pool = self._pool
        pool.shutdown(wait=False, cancel_futures=True)
        if not await self._wait_idle(grace):
            log.warning("killing process-pool children still running after %.1fs", grace)
            self._kill_children(pool)

    def _kill_children(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        # SIGKILL because children ignore SIGTERM. (Python 3.14's
        # kill_workers() does nothing once the pool is shut down.)
        for process in list(self._children.get(pool, {}).values()):
            process.kill()  # a no-op for a child already reaped
