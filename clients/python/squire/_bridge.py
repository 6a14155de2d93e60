"""Running blocking gRPC calls under asyncio.

Why: with grpcio 1.85, a ``grpc.aio`` client whose write fails because the
server has just ended a client-streaming call replaces the server's status
with ``INTERNAL: Internal error from Core`` (grpc/grpc#36066). A directive
that fails while its input is still streaming would then lose its "Fatal
operation error: ..." message. The blocking stack reports the real status, so
:class:`AsyncClient` runs its two client-streaming calls (RunDirective,
Publish) there, in threads, and hands the results to the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterable, Callable, Iterator
from typing import Any


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: Any) -> None:
    """Schedule ``callback`` on ``loop`` from any thread; a closed loop has no listener."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed
        pass


class BlockingInputs:
    """An async iterable seen as a blocking iterator by a gRPC thread.

    Each ``next()`` pulls one element on the event loop, so the user's async
    generator runs where it was created. :meth:`cancel` ends the iteration.
    """

    def __init__(self, source: AsyncIterable[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._source = aiter(source)
        self._loop = loop
        self._pending: concurrent.futures.Future[tuple[bool, Any]] | None = None
        self._cancelled = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._cancelled:
            raise StopIteration
        self._pending = asyncio.run_coroutine_threadsafe(self._pull(), self._loop)
        try:
            more, value = self._pending.result()
        except concurrent.futures.CancelledError:
            raise StopIteration from None
        if not more:
            raise StopIteration
        return value

    async def _pull(self) -> tuple[bool, Any]:
        try:
            return True, await anext(self._source)
        except StopAsyncIteration:
            return False, None

    def cancel(self) -> None:
        self._cancelled = True
        if self._pending is not None:
            self._pending.cancel()
