"""What runs inside a process-pool child.

The child builds its own Registry by importing the ops modules by name, so
only names, bytes and numbers cross the process boundary (the pool pickles
the arguments and the result; nothing from the network is ever unpickled).
Decoding and encoding happen here, which keeps the parent a router of bytes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import MutableSequence, Sequence

from squire_kernel.operations import Registry
from worker_service._abort import SlotSignal
from worker_service._execute import run_task
from worker_service._model import Outcome

_registry = Registry()
_flags: MutableSequence[int] = []


def init_child(modules: Sequence[str], flags: MutableSequence[int]) -> None:
    """Pool initializer: import the ops modules and keep the abort flags."""
    global _registry, _flags
    # A terminal's Ctrl-C (or a group-wide SIGTERM) reaches every process of
    # the group; the parent drains and decides when children stop, so they
    # ignore both and are killed explicitly at the drain deadline.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    _registry = Registry.from_modules(modules)
    _flags = flags


def _exit_with_parent() -> None:
    """End this child as soon as the worker process is gone, however it died.

    A child waits for work on the pool's call queue, whose writer end it holds
    itself, so it never sees end-of-file there: a worker killed with SIGKILL
    (the OOM killer, a lost node) would leave its children waiting forever.
    The sentinel multiprocessing gives a spawned child becomes readable when
    the parent exits, so a daemon thread waits on it.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        os._exit(1)  # the parent is gone: nobody wants this child's results

    threading.Thread(target=watch, name="squire-parent-watch", daemon=True).start()


def offered() -> tuple[list[str], list[str]]:
    """The names this child can run: a start-up check that imports worked."""
    return sorted(_registry.operations), sorted(_registry.monoids)


def run_in_child(
    kind: int,
    operation: str,
    params: bytes,
    input: bytes,
    operands: Sequence[bytes],
    serializer: int,
    slot: int,
    retry: int,
) -> Outcome:
    return run_task(
        _registry, kind, operation, params, input, operands, serializer,
        SlotSignal(_flags, slot), retry,
    )
