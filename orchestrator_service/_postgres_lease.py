"""The leader lease on Postgres: one row, taken by compare-and-set.

- ``campaign`` runs ``UPDATE lease SET holder, epoch = epoch + 1, expires_at
  = now + ttl WHERE holder IS NULL OR expires_at <= now``: of several
  standbys exactly one row update wins, and the epoch grows by one each time
  leadership changes hands. Until it wins it polls (every ``ttl / 6``, at
  most 0.25 s, and just after the holder's lease runs out), so a released
  lease is taken within a poll and a dead holder's within its TTL. Expiry is
  judged by the database's clock alone: replicas' clocks need not agree.
- Renewal, every ``ttl / 3``, moves ``expires_at`` on, only while the row
  still has this epoch. This process counts its lease valid until ``ttl``
  after it *sent* the last renewal that succeeded, which is never later than
  the ``expires_at`` that renewal wrote, so it gives the lease up (``lost``)
  before anyone can take it, unless the process itself stops (SIGSTOP, a
  long pause): then the epoch fences its writes (``_postgres_store``).
- ``lost`` is set, once, when renewal has failed for ``ttl`` (Postgres
  unreachable), when another holder took over (a newer epoch), or on
  ``resign()``; ``ended`` says which. Leadership does not come back to this
  object: the next term is a new campaign by a new store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from orchestrator_service._journal_types import Leader, StoreError, StoreFenced
from orchestrator_service._postgres_conn import Link, classify, transient
from orchestrator_service._postgres_schema import Statements

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


class Lease:
    def __init__(self, link: Link, st: Statements, shown: str,
                 on_end: Callable[[StoreFenced], None]) -> None:
        self.link = link
        self.st = st
        self.shown = shown
        self.on_end = on_end
        self.lost = asyncio.Event()
        self.ended: StoreFenced | None = None  # why ``lost`` is set
        self.epoch: int | None = None
        self.holder = ""
        self.address = ""
        self.ttl = 0.0
        self.valid_until = 0.0  # time.monotonic() until which this process leads
        self.renewals = 0
        self._renewal: asyncio.Task[None] | None = None

    @property
    def held(self) -> bool:
        return self.epoch is not None and not self.lost.is_set()

    async def campaign(self, holder: str, address: str, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"a lease TTL must be positive, not {ttl}")
        if self.lost.is_set():
            raise StoreError("FAILED_PRECONDITION", f"journal {self.shown}: this store's "
                             "lease ended; a new term needs a new store")
        if self.epoch is not None:
            return self.epoch
        poll = min(ttl / 6, 0.25)
        delay = BACKOFF_FIRST
        failing: str | None = None
        standing_by: int | None = None
        while True:
            sent = time.monotonic()
            try:
                async with self.link.use() as conn:
                    epoch = await conn.fetchval(self.st.take, holder, address, ttl, timeout=ttl)
                    row = None if epoch is not None else await conn.fetchrow(self.st.peek,
                                                                             timeout=ttl)
            except Exception as exc:
                error = classify(exc, self.shown, self.link.password_from)
                if not transient(exc):
                    raise error from exc
                if error.message != failing:
                    log.warning("campaigning for the leader lease: %s; retrying", error.message)
                    failing = error.message
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay, failing = BACKOFF_FIRST, None
            if epoch is not None:
                self.epoch, self.holder, self.address, self.ttl = int(epoch), holder, address, ttl
                self.valid_until = sent + ttl
                self._renewal = asyncio.create_task(self._renew(), name="squire-lease-renewal")
                log.info("journal %s: %s leads with epoch %d (lease TTL %.1f s)",
                         self.shown, holder, self.epoch, ttl)
                return self.epoch
            assert row is not None
            if row["epoch"] != standing_by:
                standing_by = row["epoch"]
                log.info("journal %s: standing by; %s leads with epoch %d", self.shown,
                         row["holder"], row["epoch"])
            await asyncio.sleep(min(poll, max(0.0, row["left"]) + 0.005))

    async def _renew(self) -> None:
        assert self.epoch is not None
        epoch, ttl = self.epoch, self.ttl
        every = ttl / 3
        wait = every
        failing: str | None = None
        while True:
            await asyncio.sleep(max(0.0, min(wait, self.valid_until - time.monotonic())))
            sent = time.monotonic()
            left = self.valid_until - sent
            if left <= 0:
                self._end(StoreFenced(epoch, None, (
                    f"journal {self.shown}: the leader lease of epoch {epoch} lapsed: not "
                    f"renewed for {ttl:g} s ({failing or 'this process did not run in time'})")))
                await self._learn_newer()
                return
            newer: int | None = None
            try:
                async with self.link.use(timeout=left) as conn:
                    got = await conn.fetchval(self.st.renew, epoch, ttl, timeout=left)
                    if got is None:
                        newer = await conn.fetchval(self.st.epoch, timeout=left)
            except Exception as exc:
                error = classify(exc, self.shown, self.link.password_from)
                if error.message != failing:
                    log.warning("renewing the leader lease (epoch %d, %.1f s left): %s",
                                epoch, left, error.message)
                    failing = error.message
                wait = min(every / 4, 0.25)
                continue
            if got is None:
                self._end(self._fenced_by(newer))
                return
            if failing is not None:
                log.warning("journal %s: the leader lease of epoch %d is renewed again",
                            self.shown, epoch)
            failing = None
            self.valid_until = sent + ttl
            self.renewals += 1
            wait = every

    def _end(self, why: StoreFenced, level: int = logging.WARNING) -> None:
        if self.lost.is_set():
            return
        self.ended = why
        self.lost.set()
        log.log(level, "%s", why.message)
        self.on_end(why)

    def _fenced_by(self, newer: int | None) -> StoreFenced:
        assert self.epoch is not None
        return StoreFenced(self.epoch, newer, (
            f"journal {self.shown}: epoch {newer} holds the leader lease now; this "
            f"orchestrator's epoch {self.epoch} is fenced and its writes change nothing"))

    def fenced(self, newer: int) -> StoreFenced:
        """A write found ``newer`` in the lease row: the lease is gone."""
        why = self._fenced_by(newer)
        if self.ended is not None and self.ended.newer is None:
            self.ended = why  # it had lapsed; now we know who took it
        self._end(why)
        return self.ended or why

    async def _learn_newer(self) -> None:
        """After a lapse, which ``lost`` reports at once: if Postgres answers
        quickly, name the epoch that took over in what writes are told."""
        try:
            async with self.link.use(timeout=0.25) as conn:
                newer = await conn.fetchval(self.st.epoch, timeout=0.25)
        except Exception:
            return
        if self.epoch is not None and newer is not None and newer > self.epoch:
            self.ended = self._fenced_by(int(newer))

    async def resign(self) -> None:
        """Release the lease row at once (a standby's next poll takes it)."""
        if not self.held:
            return
        assert self.epoch is not None
        await self.stop()
        try:
            async with self.link.use(timeout=1.0) as conn:
                await conn.execute(self.st.release, self.epoch, timeout=1.0)
        except Exception as exc:
            log.warning("resigning the leader lease of epoch %d: %s; it lapses in %.1f s",
                        self.epoch, classify(exc, self.shown).message, self.ttl)
        self._end(StoreFenced(self.epoch, None, f"journal {self.shown}: this orchestrator "
                              f"resigned the leader lease of epoch {self.epoch}"), logging.INFO)

    async def stop(self) -> None:
        """Stop renewing (the lease lapses after its TTL unless released)."""
        task, self._renewal = self._renewal, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise

    async def current(self, link: Link) -> Leader | None:
        async with link.use() as conn:
            row = await conn.fetchrow(self.st.peek, timeout=5.0)
        if row is None or row["holder"] is None or row["left"] <= 0:
            return None
        return Leader(row["holder"], row["address"] or "", int(row["epoch"]))
