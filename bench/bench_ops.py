"""Operations for the benchmark: as cheap as possible, so Squire's own cost shows."""

from __future__ import annotations

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
