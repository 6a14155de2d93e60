"""The leader lease of a store that one process holds alone (SQLite, whose
flock keeps a second orchestrator out, and memory:, which nobody else can
see): that process is the leader from ``open()`` to ``close()``, and its
epoch is the one ``open()`` took.

``campaign()`` before ``open()`` opens the journal (so it takes the lock and
the epoch, and may raise ``StoreInUse`` rather than wait: a SQLite journal is
never shared) and the following ``open()`` hands over what that loaded;
after ``open()`` it only names the holder.
``resign()`` only says so — ``lost`` is set and ``leader()`` is None — since
nobody can take over before ``close()`` releases the journal.
"""

from __future__ import annotations

import asyncio
import os
import socket

from orchestrator_service._journal_types import (
    DEFAULT_LEASE_TTL,
    Leader,
    Recovered,
    StoreError,
)


def default_holder() -> str:
    """How a process is named in the lease when its caller names it not."""
    return f"{socket.gethostname()}:{os.getpid()}"


class SoleLeader:
    """Mixed into a store class that implements ``_open_journal()``."""

    lost: asyncio.Event
    _early: Recovered | None
    _lead: Leader | None

    def _init_lease(self) -> None:
        self.lost = asyncio.Event()
        self._early = None  # what campaign() opened, for the open() after it
        self._lead = None

    async def _open_journal(self) -> Recovered:
        raise NotImplementedError

    async def open(self) -> Recovered:
        if self._early is not None:
            recovered, self._early = self._early, None
            return recovered
        recovered = await self._open_journal()
        self._lead = Leader(default_holder(), "", recovered.epoch)
        return recovered

    async def campaign(self, holder: str, address: str, ttl: float = DEFAULT_LEASE_TTL) -> int:
        if self.lost.is_set():
            raise StoreError("FAILED_PRECONDITION", "this store resigned its lease; "
                             "a new lease needs a new store")
        if self._lead is None:  # before open(): open now, hand it over later
            self._early = await self._open_journal()
            epoch = self._early.epoch
        else:
            epoch = self._lead.epoch
        self._lead = Leader(holder, address, epoch)
        return epoch

    async def leader(self) -> Leader | None:
        return None if self.lost.is_set() else self._lead

    async def resign(self) -> None:
        self.lost.set()
