"""The process executor: long-lived spawned children fed batches over sockets.

Each of ``concurrency`` children (``_child``) is spawned once, imports the
ops modules, and serves one end of a socketpair: batches of tasks go in as
one MessagePack frame (``_frames``), results come back in batches. The
parent never decodes a payload and nothing crossing the boundary is
pickled. The event loop watches each socket (``add_reader``), so a batch of
results is one callback and one ``ExecutionFinished``.

**How many tasks a child holds** beyond the one it runs is ``_depth``'s
rule: a short queue of estimated work, so that a slow operation gets one
task per child -- as before batching -- and a no-op hundreds. The
executor's ``capacity`` follows (reported with every ``ExecutionFinished``);
a task that fits no child when it is submitted is handed back unstarted
(``returned``) to the scheduler's FIFO, with every task after it, so what
waits for a child waits where drains, aborts and timeouts see it as queued.
A task whose abort signal is set before it starts is not run.

**A child that dies** takes only its own tasks. The one it was running (its
cell in the shared ``running`` array names it) is reported as a crash of
its own, as a task alone in a pool always was, which the orchestrator
counts towards poison; the rest of its queue never ran (or ran, but their
results died with it) and goes back to the FIFO without blame. Other
children go on; a replacement is spawned at once.

Abort flags live in shared memory, one per slot; a slot belongs to one task
from ``submit`` until its result is in, so setting a flag can never abort
another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from worker_service import _child, _depth, _frames
from worker_service._depth import MAX_DEPTH, UNSEEN_SECONDS, learn, room
from worker_service._errors import OpsLoadError
from worker_service._model import TaskSpec, aborted_failure
from worker_service._scheduler_events import Executed, ExecutionFinished, PoolCrashed

log = logging.getLogger("worker_service.executor")

Sink = Callable[[ExecutionFinished | PoolCrashed], None]

# Reported as the crashed task's error type, as when this was a ProcessPoolExecutor.
CRASH_ERROR_TYPE = "BrokenProcessPool"
# Before replacing a child that died before it was ready (its imports fail).
RESPAWN_DELAY = 1.0
# After the sockets close, how long idle children get to exit before SIGKILL.
EXIT_WAIT = 1.0


class _Child:
    __slots__ = ("alive", "backlog", "held", "index", "out", "process", "progress_at", "reader",
                 "ready", "sock", "withdrawing")

    def __init__(self, index: int, process: Any, sock: socket.socket) -> None:
        self.index = index
        self.process = process
        self.sock = sock
        self.reader = _frames.Reader()
        self.held: dict[int, TaskSpec] = {}  # slot -> task, in the order sent
        self.backlog = 0.0                   # estimated seconds of the held tasks
        self.out = bytearray()               # frames the socket did not take yet
        self.ready = False
        self.alive = True
        self.progress_at = 0.0    # when it last reported results, or was given work idle
        self.withdrawing = False  # asked for its queue back, no answer yet


class ProcessExecutor:
    """``concurrency`` spawned children that import the ops modules."""

    def __init__(self, modules: Sequence[str], concurrency: int) -> None:
        self.concurrency = concurrency
        self._modules = tuple(modules)
        # spawn, not fork: forking a process that runs gRPC threads is unsafe.
        self._context = multiprocessing.get_context("spawn")
        slots = concurrency * MAX_DEPTH
        self._flags = self._context.RawArray("b", slots)          # abort flag per slot
        self._running = self._context.RawArray("i", concurrency)  # per child: slot + 1
        self._free = list(range(slots - 1, -1, -1))
        self._slot_of: dict[TaskSpec, int] = {}
        self._estimate_at = [0.0] * slots  # what each held task adds to its child's backlog
        self._sent_at = [0.0] * slots
        self._estimates: dict[tuple[int, str], float] = {}
        # An estimate over every operation, the capacity's yardstick (the
        # scheduler cannot say which operations it will submit next).
        self._yardstick: float | None = None
        self._children: list[_Child] = []
        self._sink: Sink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._started: asyncio.Future[None] | None = None
        self._respawns: dict[int, asyncio.TimerHandle] = {}
        self._stall_check: asyncio.TimerHandle | None = None
        self._closing = False

    # -------------------------------------------------------------- probes

    @property
    def capacity(self) -> int:
        """Tasks held now plus what the ready children have room for."""
        estimate = self._yardstick
        free = sum(room(len(c.held), c.backlog, estimate) for c in self._children if c.ready)
        return max(1, len(self._slot_of) + free)

    @property
    def busy(self) -> int:
        return len(self._slot_of)

    def attach(self, sink: Sink | None) -> None:
        self._sink = sink

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Spawn every child now and wait until each has imported the ops modules.

        Spawning takes a while; doing it before the hello keeps that latency
        off the first tasks and turns an import failure into a start-up error.
        """
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self._children = [self._spawn(index) for index in range(self.concurrency)]
        try:
            await self._started
        except OpsLoadError:
            await self.close(0)
            raise

    def _spawn(self, index: int) -> _Child:
        loop = self._loop
        assert loop is not None
        ours, theirs = socket.socketpair()
        process = self._context.Process(
            target=_child.main, name=f"squire-child-{index}",
            args=(self._modules, theirs, self._flags, self._running, index),
        )
        try:
            process.start()
        finally:
            theirs.close()
        ours.setblocking(False)
        child = _Child(index, process, ours)
        loop.add_reader(ours.fileno(), self._readable, child)
        loop.add_reader(process.sentinel, self._lost, child)
        return child

    async def close(self, grace: float) -> None:
        self._closing = True
        if self._stall_check is not None:
            self._stall_check.cancel()
        for handle in self._respawns.values():
            handle.cancel()
        self._respawns.clear()
        for slot in self._slot_of.values():
            self._flags[slot] = 1
        if self._slot_of:
            try:
                async with asyncio.timeout(grace):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("killing process-executor children still running after %.1fs", grace)
        for child in self._children:
            if child.alive and child.held:
                child.process.kill()  # SIGKILL: children ignore SIGTERM
            self._forget(child)       # an idle child sees end-of-file and exits
        await self._exited(EXIT_WAIT)
        for child in self._children:
            if child.process.is_alive():
                child.process.kill()
            child.process.join(1.0)
        self._slot_of.clear()
        self._idle.set()

    async def _exited(self, within: float) -> None:
        """Wait up to ``within`` seconds for every child process to end."""
        for _ in range(int(within / 0.01)):
            if not any(c.process.is_alive() for c in self._children):
                return
            await asyncio.sleep(0.01)

    def _forget(self, child: _Child) -> None:
        """Stop watching ``child`` and close our end of its socket."""
        if not child.alive:
            return
        child.alive = child.ready = False
        loop = self._loop
        assert loop is not None
        loop.remove_reader(child.sock.fileno())
        loop.remove_writer(child.sock.fileno())
        loop.remove_reader(child.process.sentinel)
        child.sock.close()

    # --------------------------------------------------------------- tasks

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        batches: dict[_Child, list[list[Any]]] = {}
        returned: list[TaskSpec] = []
        now = time.perf_counter()
        estimates, flags, children = self._estimates, self._flags, self._children
        for at, task in enumerate(tasks):
            estimate = estimates.get((task.kind, task.operation))
            best: _Child | None = None
            for child in children:
                if child.ready and (best is None or child.backlog < best.backlog):
                    best = child
            if best is None or not room(len(best.held), best.backlog, estimate):
                # The rest too: nothing overtakes a task that waits for room
                # (it would keep every child busy, and the task waiting).
                returned = list(tasks[at:])
                break
            if estimate is None:
                estimate = UNSEEN_SECONDS
            slot = self._free.pop()
            flags[slot] = 0
            self._slot_of[task] = slot
            self._estimate_at[slot] = estimate
            self._sent_at[slot] = now
            if not best.held:
                best.progress_at = now
            best.held[slot] = task
            best.backlog += estimate
            batches.setdefault(best, []).append([
                slot, task.kind, task.operation, task.params, task.input, task.operands,
                task.serializer, task.retries + 1, estimate,
            ])
        if self._slot_of:
            self._idle.clear()
        if batches and self._stall_check is None:
            assert self._loop is not None
            self._stall_check = self._loop.call_later(_depth.STALL_CHECK, self._check_stalls)
        for child, rows in batches.items():
            self._send(child, _frames.pack(rows))
        if returned:
            # No room until results come in: the capacity they report says how much.
            self._emit(ExecutionFinished((), len(self._slot_of), returned))

    def abort(self, tasks: Iterable[TaskSpec]) -> None:
        slot_of, flags = self._slot_of, self._flags
        for task in tasks:
            slot = slot_of.get(task)
            if slot is not None:  # still ours: the slot serves no other task
                flags[slot] = 1

    def _send(self, child: _Child, frame: bytes) -> None:
        if child.out:  # the socket is full: the writer callback sends it in order
            child.out += frame
            return
        try:
            sent = child.sock.send(frame)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the child is gone; _lost hands its tasks back
        if sent < len(frame):
            child.out += frame[sent:]
            assert self._loop is not None
            self._loop.add_writer(child.sock.fileno(), self._writable, child)

    def _writable(self, child: _Child) -> None:
        try:
            sent = child.sock.send(child.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(child.out)
        del child.out[:sent]
        if not child.out:
            assert self._loop is not None
            self._loop.remove_writer(child.sock.fileno())

    # ------------------------------------------------------------- results

    def _readable(self, child: _Child) -> None:
        try:
            data = child.sock.recv(1 << 22)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(child)
            return
        self._on_frames(child, child.reader.feed(data))

    def _on_frames(self, child: _Child, frames: list[Any]) -> None:
        executed: list[Executed] = []
        for frame in frames:
            if frame[0] == _frames.RESULTS:
                self._results(child, frame[1], executed)
            elif frame[0] == _frames.WITHDRAWN:
                self._withdrawn(child, frame[1])
            elif frame[0] == _frames.READY:
                child.ready = True
                self._became_ready()
            else:
                log.error("a process-executor child cannot import the ops modules:\n%s", frame[1])
        if executed:
            if not self._slot_of:
                self._idle.set()
            self._emit(ExecutionFinished(executed, self.capacity))

    def _results(self, child: _Child, rows: list[list[Any]], executed: list[Executed]) -> None:
        held, estimates, free = child.held, self._estimates, self._free
        estimate_at, slot_of = self._estimate_at, self._slot_of
        yardstick = self._yardstick
        for row in rows:
            slot, seconds = row[0], row[1]
            task = held.pop(slot)
            del slot_of[task]
            free.append(slot)
            child.backlog -= estimate_at[slot]
            key = (task.kind, task.operation)
            if len(row) == 2:  # its abort signal was set before it started
                executed.append((task, aborted_failure(task.routing_key), 0.0))
                continue
            estimates[key] = learn(estimates.get(key), seconds)
            yardstick = learn(yardstick, seconds)
            executed.append((task, _frames.outcome(row), seconds))
        self._yardstick = yardstick
        child.progress_at = time.perf_counter()
        if not held:
            child.backlog = 0.0  # no drift from the sums

    def _check_stalls(self) -> None:
        self._stall_check = None
        if self._closing:
            return
        now = time.perf_counter()
        queues = False
        for child in self._children:
            if not child.ready or len(child.held) < 2:
                continue
            queues = True
            slot = self._running[child.index] - 1
            if child.withdrawing or slot not in child.held:
                continue
            patience = max(_depth.STALL_SECONDS, _depth.STALL_FACTOR * self._estimate_at[slot])
            if now - child.progress_at > patience:
                child.withdrawing = True
                with contextlib.suppress(ProcessLookupError):  # dead: _lost takes its tasks
                    os.kill(child.process.pid, signal.SIGUSR1)
        if queues:
            assert self._loop is not None
            self._stall_check = self._loop.call_later(_depth.STALL_CHECK, self._check_stalls)

    def _withdrawn(self, child: _Child, slots: list[int]) -> None:
        """``child`` gave back these queued tasks: they go back to the FIFO."""
        child.withdrawing = False
        returned = self._give_back(child, slots)
        running = self._running[child.index] - 1
        stuck = child.held.get(running)
        if stuck is not None:
            # It has run this long at least: what its operation is expected to take now.
            seconds = time.perf_counter() - child.progress_at
            key = (stuck.kind, stuck.operation)
            self._estimates[key] = max(self._estimates.get(key, 0.0), seconds)
            self._yardstick = max(self._yardstick or 0.0, seconds)
            child.backlog += seconds - self._estimate_at[running]
            self._estimate_at[running] = seconds
        if returned:
            log.warning("process-executor child %d has run one task for %.2fs: %d task(s) "
                        "queued behind it go back to the queue", child.index,
                        time.perf_counter() - child.progress_at, len(returned))
            self._emit(ExecutionFinished((), self.capacity, returned))

    def _became_ready(self) -> None:
        if self._started is not None and not self._started.done():
            if all(c.ready for c in self._children):
                self._started.set_result(None)
            return
        # A replacement: its room is news to the scheduler.
        self._emit(ExecutionFinished((), self.capacity))

    def _lost(self, child: _Child) -> None:
        """``child`` died (end-of-file on its socket, or its process ended)."""
        if not child.alive:
            return
        # Results it sent before dying are delivered, not run again.
        frames: list[Any] = []
        while True:
            try:
                data = child.sock.recv(1 << 22)
            except (BlockingIOError, InterruptedError, OSError):
                break
            if not data:
                break
            frames += child.reader.feed(data)
        self._on_frames(child, frames)
        was_ready = child.ready
        self._forget(child)
        child.process.join(0.1)
        running = self._running[child.index] - 1
        self._running[child.index] = 0
        [culprit] = self._give_back(child, [running]) if running in child.held else [None]
        innocent = self._give_back(child, list(child.held))
        now = time.perf_counter()
        log.error(
            "process-executor child %d (pid %s) died, exit code %s%s; %d task(s) it held "
            "go back to the queue", child.index, child.process.pid, child.process.exitcode,
            f", running task {culprit.routing_key}/{culprit.task_id}" if culprit else "",
            len(innocent),
        )
        if self._started is not None and not self._started.done():
            self._started.set_exception(OpsLoadError(
                f"process executor children cannot import the ops modules "
                f"{', '.join(self._modules)} (see the traceback above)"
            ))
            return
        if not self._closing:
            if was_ready:
                self._children[child.index] = self._spawn(child.index)
            else:  # it could not even start: do not spin
                assert self._loop is not None
                self._respawns[child.index] = self._loop.call_later(
                    RESPAWN_DELAY, self._respawn, child.index)
        if culprit is not None:
            self._emit(PoolCrashed(
                [(culprit, now - self._sent_at[running])], False, CRASH_ERROR_TYPE))
        if innocent:
            self._emit(ExecutionFinished((), self.capacity, innocent))

    def _give_back(self, child: _Child, slots: list[int]) -> list[TaskSpec]:
        """Take these slots' tasks from ``child`` and free the slots."""
        tasks = [child.held.pop(slot) for slot in slots]
        for slot, task in zip(slots, tasks, strict=True):
            del self._slot_of[task]
            self._free.append(slot)
            child.backlog -= self._estimate_at[slot]
        if not child.held:
            child.backlog = 0.0
        if not self._slot_of:
            self._idle.set()
        return tasks

    def _respawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        if not self._closing:
            self._children[index] = self._spawn(index)

    def _emit(self, event: ExecutionFinished | PoolCrashed) -> None:
        if self._sink is not None:
            self._sink(event)
