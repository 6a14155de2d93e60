"""Waiting out an orchestrator that went away: restarts, failovers.

A call that fails with UNAVAILABLE after its work was accepted (journaled)
is tried again with exponential backoff (50 ms doubling to 1 s) for
``reattach_timeout`` seconds, counted from the first failure. Directives
reattach by id (``squire._directive``); leased channels resend what was not
acknowledged and resubscribe with how many results they have
(``squire._channel``). Nothing here does I/O but sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from squire._errors import translate_rpc_error

T = TypeVar("T")

FIRST_DELAY = 0.05
MAX_DELAY = 1.0


def status(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def unavailable(exc: grpc.RpcError) -> bool:
    return status(exc) is grpc.StatusCode.UNAVAILABLE


def subscribed(metadata: Iterable[tuple[str, object]] | None) -> bool:
    """The orchestrator accepted a Subscribe (its initial metadata says so)."""
    return any(key == "squire-subscribed" for key, _ in metadata or ())


class Backoff:
    """Delays for one outage: None once ``timeout`` has passed since it began."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self._delay = FIRST_DELAY

    def next(self) -> float | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        delay = min(self._delay, left)
        self._delay = min(self._delay * 2, MAX_DELAY)
        return delay


class _Attempts:
    """The retry decision both :func:`call_retrying` flavours share."""

    def __init__(self, reattach_timeout: float, done_if: grpc.StatusCode | None) -> None:
        self._timeout = reattach_timeout
        self._done_if = done_if
        self._backoff: Backoff | None = None

    def failed(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before the next attempt; None: the call took effect
        (``done_if`` on a retry). Raises the SDK's error once it gives up."""
        if self._backoff is not None and self._done_if is not None \
                and status(exc) is self._done_if:
            return None
        if not unavailable(exc):
            raise translate_rpc_error(exc) from exc
        self._backoff = self._backoff or Backoff(self._timeout)
        delay = self._backoff.next()
        if delay is None:
            raise translate_rpc_error(exc) from exc
        return delay


def call_retrying(
    call: Callable[[], T], reattach_timeout: float, *, done_if: grpc.StatusCode | None = None
) -> T | None:
    """``call()``, tried again while it fails with UNAVAILABLE, for
    ``reattach_timeout`` seconds. ``done_if``: a code that, on a retry, means the first attempt
    took effect before the connection broke (returns None)."""
    attempts = _Attempts(reattach_timeout, done_if)
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            delay = attempts.failed(exc)
            if delay is None:
                return None
            time.sleep(delay)


async def acall_retrying(
    call: Callable[[], Awaitable[T]],
    reattach_timeout: float,
    *,
    done_if: grpc.StatusCode | None = None,
) -> T | None:
    """The asyncio twin of :func:`call_retrying`."""
    attempts = _Attempts(reattach_timeout, done_if)
    while True:
        try:
            return await call()
        except grpc.RpcError as exc:
            delay = attempts.failed(exc)
            if delay is None:
                return None
            await asyncio.sleep(delay)
