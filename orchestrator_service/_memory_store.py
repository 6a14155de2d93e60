"""``memory:``, the null journal: nothing is stored, so every write is
"committed" the moment it is made and ``write()`` returns None — the caller's
hot path adds one call and no future. Nothing survives the process; each open
is epoch 1 and recovers nothing. It does not check writes either: checking
costs the hot path, and the SQLite store (the default) does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from orchestrator_service._journal_types import (
    Recovered,
    StoredStream,
    StoreError,
    StoreState,
    StoreStats,
    Write,
)
from orchestrator_service._sole_leader import SoleLeader

if TYPE_CHECKING:
    import asyncio


class MemoryStore(SoleLeader):
    url = "memory:"
    durable = False
    shared = False

    def __init__(self) -> None:
        self.stats = StoreStats()
        self.state = StoreState.NEW
        self._init_lease()

    async def _open_journal(self) -> Recovered:
        if self.state is not StoreState.NEW:
            raise StoreError("FAILED_PRECONDITION", f"store {self.url} is {self.state.value}")
        self.state = StoreState.OPEN
        return Recovered(epoch=1, streams=[], seconds=0.0)

    def write(self, ops: Sequence[Write]) -> asyncio.Future[None] | None:
        return None

    async def read(self, stream_id: str) -> StoredStream | None:
        return None

    async def list_streams(self) -> list[StoredStream]:
        return []

    @property
    def failure(self) -> StoreError | None:
        return None

    async def compact(self) -> None:
        return None

    async def close(self) -> None:
        self.state = StoreState.CLOSED
