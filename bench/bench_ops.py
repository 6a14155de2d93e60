"""Operations for the benchmark: as cheap as possible, so Squire's own cost shows."""

from __future__ import annotations

import time

from squire import monoid, operation


@operation("noop")
def noop(x: object) -> object:
    return x


@operation("inc")
def inc(x: int) -> int:
    return x + 1


@monoid("add", empty=0)
def add(a: int, b: int) -> int:
    return a + b


@operation("burn")
def burn(x: object, *, ms: float = 2.0) -> object:
    """Spin for ``ms`` of this thread's CPU time: a CPU-bound operation that
    costs the same however busy the machine is."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass
    return x


@operation("nap")
def nap(x: object, *, ms: float = 2.0) -> object:
    """Sleep ``ms``: work that holds a worker slot without using a core (the
    tenants benchmark's T2, where the slots are what is shared)."""
    time.sleep(ms / 1000)
    return x
