"""Operations for the worker tests (``--ops worker.ops_for_tests``).

Cross-run state lives in files named by the input where a test may use the
process executor (children share no memory with the test); the ``gated`` op
uses module state and is meant for the thread executor only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from squire import (
    After,
    FatalError,
    FatalStrategy,
    Immediate,
    TransientError,
    monoid,
    operation,
)


@operation("echo")
def echo(x: Any) -> Any:
    return x


@operation("add")
def add(x: int, *, n: int) -> int:
    return x + n


@operation("slow")
def slow(x: dict[str, Any], *, abort: Any) -> str:
    """Touch ``marker`` then run up to ``max`` seconds, polling the abort signal."""
    if x.get("marker"):
        Path(x["marker"]).touch()
    deadline = time.monotonic() + x.get("max", 10.0)
    while time.monotonic() < deadline:
        if abort.is_set():
            return "aborted"
        time.sleep(0.01)
    return "finished"


@operation("stubborn")
def stubborn(x: dict[str, Any]) -> str:
    """Append this process's pid to ``pids`` then sleep ``max`` seconds,
    deaf to the abort signal (like a C extension in a long call)."""
    with open(x["pids"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(x["max"])
    return "finished"


@operation("flaky")
def flaky(x: dict[str, Any]) -> int:
    """Fail transiently ``fail`` times (counted in the file ``counter``), then succeed."""
    counter = Path(x["counter"])
    with counter.open("a") as f:
        f.write("x")
    runs = counter.stat().st_size
    if runs <= x["fail"]:
        delay = x.get("delay", 0.0)
        retry = After(max_retries=5, delay_seconds=delay) if delay else Immediate(5)
        raise TransientError(f"flaky run {runs}", retry=retry)
    return runs


@operation("always_transient")
def always_transient(x: Any) -> None:
    raise TransientError("still flaky", retry=Immediate(2))


@operation("append_to")
def append_to(x: Any, *, items: list[Any]) -> list[Any]:
    """Mutates its parameter: each task must still get the params it was sent."""
    items.append(x)
    return items


@operation("ignored")
def ignored(x: Any) -> None:
    raise FatalError("skip this element", strategy=FatalStrategy.IGNORE)


@operation("fatal")
def fatal(x: Any) -> None:
    raise FatalError("stop the directive")


@operation("value_error")
def value_error(x: Any) -> None:
    raise ValueError(f"bad value {x}")


@operation("crash")
def crash(x: Any) -> None:
    os._exit(1)


@operation("unencodable")
def unencodable(x: Any) -> set[int]:
    return {1, 2}


@operation("abort_kwarg")
def abort_kwarg(x: Any, *, abort: Any) -> bool:
    return bool(abort.is_set())


class Gate:
    """Holds ``gated`` operations until released, counting how many run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.running = 0
        self.max_running = 0
        self.started = 0

    def reset(self) -> None:
        with self.lock:
            self.release = threading.Event()
            self.running = self.max_running = self.started = 0


GATE = Gate()


@operation("gated")
def gated(x: Any, *, abort: Any) -> Any:
    gate = GATE
    with gate.lock:
        gate.running += 1
        gate.started += 1
        gate.max_running = max(gate.max_running, gate.running)
    try:
        while not gate.release.wait(0.005):
            if abort.is_set():
                return "aborted"
        return x
    finally:
        with gate.lock:
            gate.running -= 1


@monoid("sum", empty=0)
def add_ints(a: int, b: int) -> int:
    return a + b


@monoid("join", empty="")
def join(a: str, b: str, *, sep: str) -> str:
    return f"{a}{sep}{b}" if a and b else a or b
