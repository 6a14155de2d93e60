"""Operations for the fault-injection suite (``--ops faults.fault_ops``).

Every operation that takes a ``tag`` writes its own execution ledger: one
line ``"<tag> <x>"`` per execution, appended to ``exec-<pid>.log`` in the
directory named by ``SQUIRE_FAULT_DIR``. Each process owns its file, so no
two writers share one; the test reads them all to count executions per
(directive tag, index). Markers (task started, abort seen, failure raised)
are small files holding a ``time.monotonic()`` reading, which is the system
wide CLOCK_MONOTONIC on Linux and so comparable across processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from squire import (
    FatalError,
    FatalStrategy,
    Immediate,
    TransientError,
    monoid,
    operation,
)

ENV_DIR = "SQUIRE_FAULT_DIR"

_fd: tuple[int, int] | None = None  # (pid, fd) of this process's ledger file


def fault_dir() -> Path:
    return Path(os.environ[ENV_DIR])


def record(tag: str, x: int) -> None:
    """Append one execution to this process's ledger (one write: never interleaved)."""
    global _fd
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        path = fault_dir() / f"exec-{pid}.log"
        _fd = (pid, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    os.write(_fd[1], f"{tag} {x}\n".encode())


def mark(name: str) -> float:
    """Write marker ``name`` holding the current monotonic time (atomically)."""
    now = time.monotonic()
    path = fault_dir() / name
    tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
    tmp.write_text(repr(now))
    tmp.replace(path)
    return now


def marked(name: str) -> bool:
    return (fault_dir() / name).exists()


def _hold(seconds: float, abort: Any, *, tag: str, x: int) -> bool:
    """Run up to ``seconds`` polling ``abort``; True (and an abort marker) if it was set."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if abort.is_set():
            mark(f"abort-{tag}-{x}")
            return True
        time.sleep(0.005)
    return False


def record_span(tag: str, x: int, start: float, end: float) -> None:
    """Append one execution with its monotonic start and end to this
    process's span ledger (``span-<pid>.log``)."""
    path = fault_dir() / f"span-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{tag} {x} {start!r} {end!r}\n".encode())
    finally:
        os.close(fd)


# ------------------------------------------------------------- plain work


@operation("fault_timed")
def fault_timed(x: int, *, tag: str, sleep: float) -> int:
    """Sleep ``sleep`` seconds and say when (the fair-share ledger)."""
    start = time.monotonic()
    time.sleep(sleep)
    record_span(tag, x, start, time.monotonic())
    return x


@operation("fault_square")
def fault_square(x: int, *, tag: str, sleep: float = 0.0) -> int:
    record(tag, x)
    if sleep:
        time.sleep(sleep)
    return x * x


@monoid("fault_sum", empty=0)
def fault_sum(a: int, b: int) -> int:
    return a + b


# --------------------------------------------------------- failing work


@operation("fault_poison")
def fault_poison(x: int, *, tag: str, poison: int, code: int = 17) -> int:
    """Kill the process running it (the pool child, or the worker itself
    with the thread executor) when ``x == poison``."""
    record(tag, x)
    if x == poison:
        os._exit(code)
    return x * x


@operation("fault_fatal")
def fault_fatal(x: int, *, tag: str, fail_at: int, hold_at: int, message: str,
                hold: float = 20.0, abort: Any = None) -> int:
    """Element ``hold_at`` runs long and polls abort; element ``fail_at``
    raises ``message`` once ``hold_at`` is running (so the abort has a
    running task to reach)."""
    record(tag, x)
    if x == hold_at:
        mark(f"started-{tag}-{x}")
        if _hold(hold, abort, tag=tag, x=x):
            return -1
        return x * x
    if x == fail_at:
        deadline = time.monotonic() + 20.0
        while not marked(f"started-{tag}-{hold_at}") and time.monotonic() < deadline:
            time.sleep(0.005)
        mark(f"failed-{tag}-{x}")
        raise RuntimeError(message)
    return x * x


@operation("fault_flaky")
def fault_flaky(x: int, *, tag: str, failures: int = 2) -> int:
    """Fail transiently ``failures`` times per element, then succeed.

    The attempt count lives in exclusively created files so retries in any
    pool child (or another worker) see it.
    """
    record(tag, x)
    for attempt in range(failures):
        try:
            fd = os.open(fault_dir() / f"flaky-{tag}-{x}-{attempt}",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        os.close(fd)
        raise TransientError(f"flaky attempt {attempt + 1} of element {x}", retry=Immediate(3))
    return x * x


@operation("fault_always_transient")
def fault_always_transient(x: int, *, tag: str, max_retries: int = 2) -> int:
    record(tag, x)
    raise TransientError(f"dependency still down for element {x}",
                         retry=Immediate(max_retries))


@operation("fault_ignore")
def fault_ignore(x: int, *, tag: str, skip: list[int]) -> int:
    record(tag, x)
    if x in skip:
        raise FatalError(f"element {x} is not worth it", strategy=FatalStrategy.IGNORE)
    return x * x


# ---------------------------------------------------------- cooperative


@operation("fault_cancellable")
def fault_cancellable(x: int, *, tag: str, slow_from: int, hold: float = 30.0,
                      abort: Any = None) -> int:
    """Quick below ``slow_from``; from there on a long run that polls abort."""
    record(tag, x)
    if x < slow_from:
        return x * x
    mark(f"started-{tag}-{x}")
    if _hold(hold, abort, tag=tag, x=x):
        return -1
    return x * x


@operation("fault_blob")
def fault_blob(x: int, *, size: int) -> str:
    """An output of ``size`` characters (message-size limits)."""
    return "x" * size


@operation("fault_heavy")
def fault_heavy(item: dict[str, Any], *, tag: str) -> dict[str, Any]:
    """A padded element in, a padded result out (memory and flow control)."""
    record(tag, item["i"])
    return {"i": item["i"], "sq": item["i"] ** 2, "pad": item["pad"]}
