"""Where tasks run: inline on the event loop, in threads, or in processes.

The pool executors own ``concurrency`` slots. A slot is taken when a task is
submitted and freed when the pool's future completes -- not when the session
stops caring about it -- so a task left running by a broken stream session
still counts against concurrency until it really ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import weakref
from collections.abc import Callable, MutableMapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from squire_kernel.operations import Registry
from worker_service import _child
from worker_service._abort import NEVER_ABORTED, AbortFlag
from worker_service._errors import OpsLoadError
from worker_service._execute import Prepared, prepare, run_task
from worker_service._model import Failure, Outcome, TaskSpec

log = logging.getLogger("worker_service.executor")


class InlineExecutor:
    """Runs tasks synchronously on the event loop, for trivial operations.

    Nothing can set an abort signal while an inline task runs (the loop is
    busy running it), so operations get a signal that is never set.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def run(self, task: TaskSpec, retry: int) -> Outcome:
        return run_task(
            self._registry, task.kind, task.operation, task.params, task.input,
            task.operands, task.serializer, NEVER_ABORTED, retry,
        )

    def prepare(
        self, kind: int, operation: str, params: bytes, serializer: int
    ) -> Prepared | Failure:
        """Resolve once what a run of tasks with these fields shares; run
        each with ``Prepared.run(..., NEVER_ABORTED, retry)``."""
        return prepare(self._registry, kind, operation, params, serializer)

    async def start(self) -> None:
        return None

    async def close(self, grace: float) -> None:
        return None


class Submitted:
    """A task occupying a pool slot."""

    __slots__ = ("_abort", "_cf", "future", "pool")

    def __init__(
        self,
        cf: concurrent.futures.Future[Outcome],
        future: asyncio.Future[Outcome],
        abort: Callable[[], None],
        pool: concurrent.futures.Executor,
    ) -> None:
        self._cf = cf
        self._abort = abort
        self.future = future
        self.pool = pool

    def abort(self) -> None:
        # Once the pool future is done its slot may already serve another
        # task; setting the flag now would abort that one instead.
        if not self._cf.done():
            self._abort()


class _PoolExecutor:
    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self._free = list(range(concurrency))
        self._all_free = asyncio.Event()
        self._all_free.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by the current stream session: called when a slot frees up.
        self.on_slot_freed: Callable[[], None] | None = None
        # Broken pools -> how many tasks they were running when they broke.
        self._break_sizes: weakref.WeakKeyDictionary[concurrent.futures.Executor, int] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def free_slots(self) -> int:
        return len(self._free)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _take_slot(self) -> int:
        slot = self._free.pop()
        self._all_free.clear()
        return slot

    def crash_shared(self, pool: concurrent.futures.Executor) -> bool:
        """True if ``pool`` broke while running more than one task: any of
        them may have killed it, so none can be blamed yet."""
        return self._break_sizes.get(pool, 1) > 1

    def _track(
        self,
        cf: concurrent.futures.Future[Outcome],
        slot: int,
        pool: concurrent.futures.Executor,
    ) -> asyncio.Future[Outcome]:
        loop = self._loop
        assert loop is not None, "start() the executor first"

        def done(_: concurrent.futures.Future[Outcome]) -> None:
            try:
                loop.call_soon_threadsafe(self._release, slot, cf, pool)
            except RuntimeError:  # the loop is closed: the worker is gone
                pass

        # Added before wrap_future adds its own callback, so the slot is free
        # again by the time the awaiting coroutine sees the outcome.
        cf.add_done_callback(done)
        future = asyncio.wrap_future(cf, loop=loop)
        future.add_done_callback(_consume)
        return future

    def _release(
        self,
        slot: int,
        cf: concurrent.futures.Future[Outcome],
        pool: concurrent.futures.Executor,
    ) -> None:
        if pool not in self._break_sizes and _broke(cf):
            # A broken pool fails all its futures at once, so at its first
            # report every task it was running still holds a slot.
            self._break_sizes[pool] = self.concurrency - len(self._free)
        self._free.append(slot)
        if len(self._free) == self.concurrency:
            self._all_free.set()
        if self.on_slot_freed is not None:
            self.on_slot_freed()

    async def _wait_idle(self, grace: float) -> bool:
        try:
            async with asyncio.timeout(grace):
                await self._all_free.wait()
        except TimeoutError:
            return False
        return True


def _broke(cf: concurrent.futures.Future[Outcome]) -> bool:
    return not cf.cancelled() and isinstance(cf.exception(), concurrent.futures.BrokenExecutor)


def _consume(future: asyncio.Future[Any]) -> None:
    # A session may stop awaiting a future (timeout, broken stream); mark its
    # exception retrieved so asyncio does not log it as lost.
    if not future.cancelled():
        future.exception()


class ThreadExecutor(_PoolExecutor):
    """A ThreadPoolExecutor: for operations that release the GIL or wait on I/O."""

    def __init__(self, registry: Registry, concurrency: int) -> None:
        super().__init__(concurrency)
        self._registry = registry
        self._pool = concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="squire-task"
        )
        self._flags: dict[int, AbortFlag] = {}

    def submit(self, task: TaskSpec, retry: int) -> Submitted:
        slot = self._take_slot()
        op = self._registry.operations.get(task.operation)
        flag = AbortFlag()
        self._flags[slot] = flag
        cf = self._pool.submit(
            run_task, self._registry, task.kind, task.operation, task.params, task.input,
            task.operands, task.serializer,
            flag if op is not None and op.accepts_abort else NEVER_ABORTED, retry,
        )
        return Submitted(cf, self._track(cf, slot, self._pool), flag.set, self._pool)

    async def close(self, grace: float) -> None:
        for flag in self._flags.values():
            flag.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not await self._wait_idle(grace):
            # Threads cannot be stopped from outside; interpreter exit waits
            # for them. Cooperative operations have seen their abort signal.
            log.warning(
                "%d operation(s) still running in threads after %.1fs; exit waits for them",
                self.concurrency - self.free_slots, grace,
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

    def submit(self, task: TaskSpec, retry: int) -> Submitted:
        slot = self._take_slot()
        self._flags[slot] = 0
        args = (
            task.kind, task.operation, task.params, task.input, task.operands,
            task.serializer, slot, retry,
        )
        try:
            cf = self._pool.submit(_child.run_in_child, *args)
        except BrokenProcessPool:
            # The pool broke since the last task finished; its tasks were
            # reported already, so start afresh.
            self.replace_broken(self._pool)
            cf = self._pool.submit(_child.run_in_child, *args)
        pool = self._pool
        return Submitted(cf, self._track(cf, slot, pool), lambda: self._set_flag(slot), pool)

    def _set_flag(self, slot: int) -> None:
        self._flags[slot] = 1

    def replace_broken(self, pool: concurrent.futures.Executor) -> None:
        """Replace ``pool`` after a child died; idempotent per pool."""
        if pool is not self._pool:
            return
        log.error("a process-pool child died; starting a new pool")
        pool.shutdown(wait=False, cancel_futures=True)
        # Every future of the broken pool has failed, so nothing its other
        # children still run can be reported: kill them now. Left alone they
        # would hold CPU beyond the concurrency limit, and the pool's own
        # clean-up (SIGTERM, which children ignore, then join) would wait for
        # them -- at interpreter exit, forever if one never finishes.
        self._kill_children(pool)
        self._pool = self._new_pool()

    async def close(self, grace: float) -> None:
        for slot in range(self.concurrency):
            self._flags[slot] = 1
        pool = self._pool
        pool.shutdown(wait=False, cancel_futures=True)
        if not await self._wait_idle(grace):
            log.warning("killing process-pool children still running after %.1fs", grace)
            self._kill_children(pool)
        elif pool in self._break_sizes:
            # It broke and nobody replaced it yet: its survivors may still run
            # tasks nobody awaits (see replace_broken).
            self._kill_children(pool)

    def _kill_children(self, pool: concurrent.futures.ProcessPoolExecutor) -> None:
        # SIGKILL because children ignore SIGTERM. (Python 3.14's
        # kill_workers() does nothing once the pool is shut down.)
        for process in list(self._children.get(pool, {}).values()):
            process.kill()  # a no-op for a child already reaped


Executor = InlineExecutor | ThreadExecutor | ProcessExecutor
PoolExecutor = ThreadExecutor | ProcessExecutor
