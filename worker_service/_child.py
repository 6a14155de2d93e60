"""What runs inside a process-executor child: batches in, batches out.

A child is spawned once and lives as long as the executor. It builds its
own Registry by importing the ops modules by name, then serves one
socket: length-prefixed MessagePack frames (``_frames``) carrying batches
of tasks in, batches of results out. Only names, bytes and numbers cross
the process boundary; payloads are decoded and outputs encoded here, so
the parent stays a router of bytes and nothing is ever unpickled.

Each task carries a slot: its abort flag in a shared array the parent sets
(a cooperative operation sees it on its next poll, no message in between).
While a task runs, the child's cell in a second shared array holds that
slot + 1, so when the child dies the parent knows which task was running
-- the one to blame -- and that the others of its batch never ran or ran
to the end.

Results are sent when the queue is empty, or sooner once ``FLUSH_SECONDS``
have passed since the last send: a batch of cheap tasks goes back as one
frame, and a slow task's result does not wait long for the rest of its
batch. Not after every task of a few milliseconds, though: each frame
becomes a result message, and each of those a journal commit and item
writes at the orchestrator, which cost it ~0.3 ms of CPU apiece (C1 in
``bench/README.md``). ``FLUSH_SECONDS`` stays well below the queue's
``_depth.TARGET_SECONDS``, so the parent refills the queue before it drains.
A task the parent expects to run ``FLUSH_SECONDS`` or more first sends
what is done. SIGUSR1 asks for the tasks not started yet back
(``[WITHDRAWN, slots]``, after the results done so far): the parent sends
it when this child has held more than its running task without progress
for long, so that the queue can run elsewhere.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import MutableSequence, Sequence
from typing import Any

from squire_kernel.operations import Registry
from worker_service import _frames
from worker_service._abort import SlotSignal
from worker_service._execute import Prepared, prepare
from worker_service._model import Failure, Outcome, Transient

FLUSH_SECONDS = 0.02
# Prepared runs kept per child, keyed by (kind, operation, params, serializer).
_PREPARED_CACHE = 256


def main(
    modules: Sequence[str],
    sock: socket.socket,
    flags: MutableSequence[int],
    running: MutableSequence[int],
    index: int,
) -> None:
    """The child's entry point (a ``multiprocessing`` spawn target)."""
    # A terminal's Ctrl-C (or a group-wide SIGTERM) reaches every process of
    # the group; the parent drains and decides when children stop, so they
    # ignore both and are killed explicitly at the drain deadline.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    try:
        registry = Registry.from_modules(modules)
    except BaseException:
        traceback.print_exc()
        _frames.send(sock, [_frames.FAILED, traceback.format_exc(limit=3)])
        sys.exit(3)
    server = _Server(registry, sock, flags, running, index)
    signal.signal(signal.SIGUSR1, server.on_withdraw)
    try:
        server.send([_frames.READY, sorted(registry.operations), sorted(registry.monoids)])
        server.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the executor closed while we were starting or sending: nobody listens


class _Server:
    """The child's loop: takes tasks from its queue, runs them, sends results."""

    def __init__(
        self,
        registry: Registry,
        sock: socket.socket,
        flags: MutableSequence[int],
        running: MutableSequence[int],
        index: int,
    ) -> None:
        self.registry = registry
        self.sock = sock
        self.flags = flags
        self.running = running
        self.index = index
        self.queue: deque[list[Any]] = deque()  # received, not started
        self.results: list[list[Any]] = []      # done, not sent
        self.sending = False
        self.withdraw_due = False

    def send(self, value: Any) -> None:
        self.sending = True
        try:
            _frames.send(self.sock, value)
        finally:
            self.sending = False
        if self.withdraw_due:
            self.withdraw()

    def on_withdraw(self, signum: int, frame: object) -> None:
        """SIGUSR1: the parent wants back what has not started (this child
        has been busy for long). A signal handler runs between bytecodes of
        this very thread, so it never races the loop; it only waits for a
        send under way to finish, which it would otherwise split."""
        if self.sending:
            self.withdraw_due = True
        else:
            self.withdraw()

    def withdraw(self) -> None:
        self.withdraw_due = False
        slots = [row[0] for row in self.queue]
        self.queue.clear()
        # Done before the long run began: they need not wait for it. Taken
        # from the list in place, not swapped: the loop may hold the list to
        # append to it right after this handler returns.
        done = self.results[:]
        del self.results[:len(done)]
        if done:
            self.send([_frames.RESULTS, done])
        self.send([_frames.WITHDRAWN, slots])

    def serve(self) -> None:
        reader = _frames.Reader()
        cache: dict[tuple[int, str, bytes, int], Prepared | Failure] = {}
        signals: dict[int, SlotSignal] = {}
        clock = time.perf_counter
        queue, flags, running, index, registry = (
            self.queue, self.flags, self.running, self.index, self.registry)
        last_send = clock()
        while True:
            if not queue:
                if self.results:
                    self.flush()
                data = self.sock.recv(1 << 20)
                if not data:
                    return  # the parent closed our socket: the executor is closing
                for batch in reader.feed(data):
                    queue.extend(batch)
                last_send = clock()
                continue
            row = queue.popleft()
            slot, kind, operation, params, input, operands, serializer, retry, expected = row
            if expected >= FLUSH_SECONDS and self.results:
                self.flush()  # what is done does not wait for a task expected to be long
                last_send = clock()
            key = (kind, operation, params, serializer)
            prepared = cache.get(key)
            if prepared is None:
                if len(cache) >= _PREPARED_CACHE:
                    cache.clear()
                prepared = cache[key] = prepare(registry, kind, operation, params, serializer)
            start = clock()
            if flags[slot]:
                # Aborted before it started: as if the worker had dropped it queued.
                self.results.append([slot, 0.0])
                continue
            if isinstance(prepared, Failure):
                outcome: Outcome = prepared
            else:
                abort = signals.get(slot)
                if abort is None:
                    abort = signals[slot] = SlotSignal(flags, slot)
                running[index] = slot + 1
                outcome = prepared.run(input, operands, abort, retry)
                running[index] = 0
            end = clock()
            self.results.append(_result(slot, end - start, outcome))
            if end - last_send >= FLUSH_SECONDS:
                self.flush()
                last_send = end

    def flush(self) -> None:
        results, self.results = self.results, []
        self.send([_frames.RESULTS, results])


def _result(slot: int, seconds: float, outcome: Outcome) -> list[Any]:
    if isinstance(outcome, bytes):
        return [slot, seconds, outcome]
    if isinstance(outcome, Transient):
        return [slot, seconds, None, outcome.error_type, outcome.message, outcome.delay]
    return [
        slot, seconds, int(outcome.kind), outcome.error_type, outcome.message,
        int(outcome.strategy), outcome.retries_exhausted, outcome.retries,
    ]


def _exit_with_parent() -> None:
    """End this child as soon as the worker process is gone, however it died.

    An idle child sees end-of-file on its socket, but one running a long
    task would go on computing for nobody after a SIGKILL of the worker
    (the OOM killer, a lost node). The sentinel multiprocessing gives a
    spawned child becomes readable when the parent exits, so a daemon
    thread waits on it.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)  # the parent is gone: nobody wants this child's results

    threading.Thread(target=watch, name="squire-parent-watch", daemon=True).start()
