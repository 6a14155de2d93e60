"""A broadcast wake-up between the core's notify hooks and the servicers."""

from __future__ import annotations

import asyncio


class Signal:
    """Broadcast wake-up: ``signal()`` releases every coroutine in ``wait()``.

    The core calls it through an object's ``notify`` hook; waiters re-check
    the state they care about after waking, so spurious wake-ups are harmless.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def __call__(self) -> None:
        future = self._future
        if future is not None:
            self._future = None
            if not future.done():
                future.set_result(None)

    def future(self) -> asyncio.Future[None]:
        """The future the next ``signal()`` resolves (plain futures need no cancelling)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    async def wait(self) -> None:
        await self.future()
