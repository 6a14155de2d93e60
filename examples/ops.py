"""The demo's operations: ``squire-worker --ops squire_examples.ops``."""

from __future__ import annotations

import time

from squire import monoid, operation


@operation("fib_at")
def fib_at(n: int) -> int:
    """The n-th Fibonacci number (fib_at(1) = fib_at(2) = 1), computed iteratively."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@operation("multiply_by")
def multiply_by(x: int, *, factor: int) -> int:
    return x * factor


@operation("length")
def length(s: str) -> int:
    return len(s)


@operation("sleep")
def sleep(seconds: float) -> float:
    """Sleep ``seconds`` (at most 60) and return them: a stand-in for an
    expensive operation, for trying timeouts, draining and latency."""
    if not 0 <= seconds <= 60:
        raise ValueError(f"sleep takes 0 to 60 seconds, not {seconds!r}")
    time.sleep(seconds)
    return seconds


@monoid("sum", empty=0)
def add(a: int, b: int) -> int:
    return a + b


@monoid("multiply", empty=1)
def multiply(a: int, b: int) -> int:
    return a * b


@monoid("concat", empty="")
def concat(a: str, b: str) -> str:
    return a + b
