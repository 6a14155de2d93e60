"""Choose the event loop the services run on.

``auto`` (the default) uses uvloop when it is installed (``pip install
squire[fast]``) and asyncio's own loop otherwise; ``asyncio`` and ``uvloop``
force one. The benchmark records which loop ran (bench/README.md).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def resolve(choice: str) -> str:
    if choice not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {choice!r}: use one of {', '.join(EVENT_LOOPS)}")
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return choice


# The services allocate a few small objects per task (messages, records,
# tuples), nearly all freed at once by reference counting; the cyclic
# collector's default first generation (700 allocations) makes it run every
# few hundred tasks for almost nothing. A larger one, with the start-up
# objects frozen out of its sight, costs a little memory and saves 8 % of
# W1's worker CPU (bench/README.md, "Issue 14").
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """The services' collector settings (call once, after start-up imports)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
