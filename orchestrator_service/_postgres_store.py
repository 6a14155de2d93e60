"""The Postgres journal: the ``Store`` protocol on asyncpg, for orchestrator
replicas that share one database and take turns through the leader lease.

- ``write()`` runs on the event loop, checks the ops against the open
  streams, queues them with a future and wakes the writer task. The writer
  takes everything queued since its last commit (up to ``max_batch_bytes`` /
  ``max_batch_writes``) into one transaction of a fixed number of statements
  (``_postgres_schema.apply``), so an idle store commits a lone write at
  once and a busy one commits large batches; then it resolves the futures
  in write() order. No per-task round trip and no LISTEN/NOTIFY.
- Fencing: each transaction first takes the lease row ``FOR SHARE`` and
  goes on only if its epoch is this writer's. A takeover's ``UPDATE`` of that
  row waits for the transaction to end, and the new leader loads the journal
  after its takeover, so every write of the old epoch either committed
  before the new leader read the journal or is refused: ``StoreFenced``, and
  the transaction changes nothing. Each commit also records its sequence
  number (``commits``), so a commit whose answer was lost with the
  connection is recognised instead of being applied twice.
- A commit that fails on a broken connection is retried at once on a new
  one; while Postgres stays unreachable, again with backoff (0.1 s doubling
  to 1 s), and ``failure`` says why (UNAVAILABLE, from the second failed
  attempt) so new work is refused; the queued futures stay pending: nothing is
  acknowledged that is not committed. Back within the lease TTL, the same
  batches commit and the lease is renewed; not back in time, the lease
  lapses (``lost``) and every pending write fails with ``StoreFenced``. The
  retries are bounded by the lease.
- ``read``/``list_streams``/``leader``/``compact`` use their own connection;
  the lease renews on a third, so a long commit never delays a renewal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from orchestrator_service._journal_types import (
    DEFAULT_LEASE_TTL,
    Append,
    Leader,
    Recovered,
    StoredStream,
    StoreError,
    StoreFenced,
    StoreState,
    StoreStats,
    Write,
    check_writes,
)
from orchestrator_service._postgres_conn import Link, classify, parse_postgres_url, transient
from orchestrator_service._postgres_lease import BACKOFF_FIRST, BACKOFF_MAX, Lease
from orchestrator_service._postgres_schema import Statements, apply, load_all, load_one, prepare
from orchestrator_service._postgres_schema import list_all as _list_all
from orchestrator_service._sole_leader import default_holder

log = logging.getLogger(__name__)
T = TypeVar("T")
Queued = tuple[Sequence[Write], "asyncio.Future[None]"]


class _Fenced(Exception):
    def __init__(self, newer: int) -> None:
        self.newer = newer


def _resolve(futures: list[asyncio.Future[None]], error: StoreError | None) -> None:
    for future in futures:
        if future.done():  # cancelled by its caller
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class PostgresStore:
    durable = True
    shared = True

    def __init__(self, url: str, *, close_timeout: float = 5.0, commit_timeout: float = 10.0,
                 max_batch_bytes: int = 8 << 20, max_batch_writes: int = 10_000) -> None:
        self.parsed = parse_postgres_url(url)
        self.url = self.parsed.shown
        self.schema = self.parsed.schema
        self.close_timeout = close_timeout
        self.commit_timeout = commit_timeout
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_writes = max_batch_writes
        self.st = Statements.of(self.schema)
        self.state = StoreState.NEW
        self._size = 0
        self.stats = StoreStats(size=lambda: self._size)
        self._writer_link = Link(self.parsed, {}, "journal-writer")
        self._reader_link = Link(self.parsed, {}, "journal-reader")
        self._lease = Lease(Link(self.parsed, {}, "lease"), self.st, self.url, self._lease_ended)
        self.lost = self._lease.lost
        self._prepared = False
        self._opening = False
        self._queue: deque[Queued] = deque()
        self._last: asyncio.Future[None] | None = None  # the latest write()'s future
        self._wake = asyncio.Event()  # something is queued, or close() began
        self._kick = asyncio.Event()  # cut a retry's backoff short: close, or the lease ended
        self._open: set[str] = set()
        self._failure: StoreError | None = None
        self._batches = 0  # transactions committed in this epoch (the ``commits`` marker)
        self._close_deadline: float | None = None
        self._writer: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r}, {self.state.value})"

    # -- schema and lease ---------------------------------------------------------

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]],
                        give_up: Callable[[], StoreError | None] = lambda: None) -> T:
        """``attempt()`` until it succeeds; transient failures are retried with
        backoff (and logged once), others raised as a StoreError."""
        delay, failing = BACKOFF_FIRST, ""
        while True:
            try:
                return await attempt()
            except StoreError:
                raise
            except Exception as exc:
                error = classify(exc, self.url, self._reader_link.password_from)
                if not transient(exc):
                    raise error from exc
                if (stop := give_up()) is not None:
                    raise stop from exc
                if error.message != failing:
                    log.warning("%s: %s; retrying", what, error.message)
                    failing = error.message
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _ready(self) -> None:
        """Create or migrate the schema, once per store."""
        if self._prepared:
            return

        async def attempt() -> None:
            async with self._reader_link.use() as conn:
                await prepare(conn, self.schema, self.url)

        await self._retrying(f"preparing the journal {self.url}", attempt)
        self._prepared = True

    async def campaign(self, holder: str, address: str, ttl: float = DEFAULT_LEASE_TTL) -> int:
        if self.state is not StoreState.NEW and not self._lease.held:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.url} is {self.state.value}")
        await self._ready()

        def ms(share: float) -> str:
            return str(max(50, int(ttl * 1000 * share)))

        # a writer stuck mid-transaction (this process frozen) must not hold
        # the lease row past the TTL: the server ends such a session
        self._writer_link.settings["idle_in_transaction_session_timeout"] = ms(1.0)
        # and a lease statement waiting on the row must be ended by the
        # server, not only given up by this client: an UPDATE left waiting on
        # a dropped connection would still run once the lock is free, taking
        # (or renewing) the lease for nobody
        self._lease.link.settings.update(lock_timeout=ms(0.25), statement_timeout=ms(0.5))
        return await self._lease.campaign(holder, address, ttl)

    async def leader(self) -> Leader | None:
        if self.state is StoreState.CLOSED:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.url} is closed")
        await self._ready()
        try:
            return await self._lease.current(self._reader_link)
        except Exception as exc:
            raise classify(exc, self.url, self._reader_link.password_from) from exc

    async def resign(self) -> None:
        """Commit what is queued (for up to ``close_timeout``), then release."""
        if self.state is StoreState.OPEN and self._last is not None and not self._last.done():
            await asyncio.wait([self._last], timeout=self.close_timeout)
        await self._lease.resign()

    def _lease_ended(self, why: StoreFenced) -> None:
        self._kick.set()
        self._wake.set()

    @property
    def epoch(self) -> int | None:
        return self._lease.epoch

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> Recovered:
        if self.state is not StoreState.NEW or self._opening:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.url} is {self.state.value}")
        self._opening = True
        try:
            if self._lease.epoch is None:
                await self.campaign(default_holder(), "")
            epoch = self._lease.epoch
            assert epoch is not None
            started = time.perf_counter()

            async def attempt() -> list[StoredStream]:
                async with self._reader_link.use() as conn:
                    streams = await load_all(conn, self.st)
                    self._size = await conn.fetchval(self.st.size, self.schema)
                    return streams

            streams = await self._retrying(f"loading the journal {self.url}", attempt,
                                           lambda: self._lease.ended)
            if self._lease.ended is not None:
                raise self._lease.ended
        except BaseException:
            await self._lease.resign()
            await self._release()
            raise
        finally:
            self._opening = False
        self._open = {s.stream_id for s in streams}
        self._writer = asyncio.create_task(self._run(), name="squire-journal-writer")
        self.state = StoreState.OPEN
        return Recovered(epoch, streams, time.perf_counter() - started)

    async def close(self) -> None:
        """Commit everything queued (retrying failures for up to
        ``close_timeout`` seconds, then failing what is left), release the
        lease at once, close the connections. Idempotent."""
        if self.state is StoreState.CLOSED:
            return
        if self.state is StoreState.OPEN:
            self.state = StoreState.CLOSING
            self._close_deadline = time.monotonic() + self.close_timeout
            self._wake.set()
            self._kick.set()
        if self._writer is not None:
            await asyncio.wait([self._writer])
        if self.state is StoreState.CLOSED:  # a concurrent close() finished first
            return
        await self._lease.resign()
        await self._release()

    async def _release(self) -> None:
        await self._lease.stop()
        for link in (self._writer_link, self._reader_link, self._lease.link):
            await link.close()
        self.state = StoreState.CLOSED

    # -- the write path ----------------------------------------------------------

    def write(self, ops: Sequence[Write]) -> asyncio.Future[None] | None:
        if self.state is not StoreState.OPEN:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.url} is {self.state.value}")
        if not ops:
            return None
        future = asyncio.get_running_loop().create_future()
        if self._lease.ended is not None:  # nothing this store writes can commit any more
            future.set_exception(self._lease.ended)
            return future
        check_writes(self._open, ops)
        self._queue.append((ops, future))
        self._last = future
        self._wake.set()
        return future

    async def _run(self) -> None:
        """The writer task: take what is queued, commit it, resolve, until
        closed with nothing queued."""
        queue = self._queue
        while True:
            if not queue:
                if self.state is not StoreState.OPEN:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._lease.ended is not None:
                _resolve([f for _, f in queue], self._lease.ended)
                queue.clear()
                continue
            writes: list[Sequence[Write]] = []
            futures: list[asyncio.Future[None]] = []
            entries = nbytes = 0
            while queue and len(writes) < self.max_batch_writes and nbytes < self.max_batch_bytes:
                ops, future = queue.popleft()
                writes.append(ops)
                futures.append(future)
                for op in ops:
                    if type(op) is Append:
                        entries += len(op.entries)
                        nbytes += sum([len(e.payload) for e in op.entries])
            await self._commit(writes, futures, entries, nbytes)

    async def _attempt(self, writes: list[Sequence[Write]], seq: int, retry: bool) -> None:
        epoch = self._lease.epoch
        async with asyncio.timeout(self.commit_timeout), self._writer_link.use() as conn:
            if retry:  # did the last attempt commit, its answer lost with the connection?
                done = await conn.fetchval(self.st.batches, epoch)
                if done is not None and done >= seq:
                    return
            async with conn.transaction():
                if await conn.fetchval(self.st.fence, epoch, seq) is None:
                    raise _Fenced(await conn.fetchval(self.st.epoch))
                await apply(conn, self.st, writes)

    async def _commit(self, writes: list[Sequence[Write]], futures: list[asyncio.Future[None]],
                      entries: int, nbytes: int) -> None:
        stats = self.stats
        seq = self._batches + 1
        delay, retry = BACKOFF_FIRST, False
        while True:
            if self._lease.ended is not None:
                _resolve(futures, self._lease.ended)
                return
            started = time.perf_counter()
            try:
                await self._attempt(writes, seq, retry)
            except _Fenced as fenced:
                _resolve(futures, self._lease.fenced(fenced.newer))
                return
            except Exception as exc:
                error = classify(exc, self.url, self._writer_link.password_from)
                stats.failed_commits += 1
                past = self._close_deadline is not None and time.monotonic() >= self._close_deadline
                if not transient(exc) or past:
                    self._failure = error
                    _resolve(futures, error)
                    return
                # a connection that broke under a live server is retried at
                # once on a new one, and only a second failure is news (new
                # work is refused from then on); then back off, for a server
                # that is away
                if retry and self._failure is None:
                    log.error("%s; retrying until it commits or the lease lapses", error.message)
                if retry:
                    self._failure = error
                timeout = delay if retry else 0.0
                retry = True
                self._kick.clear()
                if self._close_deadline is not None:
                    timeout = max(0.0, min(timeout, self._close_deadline - time.monotonic()))
                try:
                    await asyncio.wait_for(self._kick.wait(), timeout)
                except TimeoutError:
                    pass
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            seconds = time.perf_counter() - started
            if self._failure is not None:
                log.warning("journal %s: commits succeed again", self.url)
            self._failure = None
            self._batches = seq
            stats.commits += 1
            stats.writes += len(writes)
            stats.entries += entries
            stats.bytes += nbytes
            stats.last_commit_seconds = seconds
            stats.total_commit_seconds += seconds
            _resolve(futures, None)
            for observe in stats.observers:
                try:
                    observe(seconds, len(writes), entries, nbytes)
                except Exception:
                    log.exception("a journal commit observer failed")
            return

    # -- reads and maintenance ----------------------------------------------------

    @property
    def failure(self) -> StoreError | None:
        return self._failure or self._lease.ended

    async def _reading(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """``fn(conn, ...)`` on the reader's connection, tried twice (the
        first try may find a connection Postgres closed since)."""
        if self.state is not StoreState.OPEN:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.url} is {self.state.value}")
        for last in (False, True):
            try:
                async with self._reader_link.use() as conn:
                    return await fn(conn, *args)
            except Exception as exc:
                if last or not transient(exc):
                    raise classify(exc, self.url, self._reader_link.password_from) from exc
        raise AssertionError("unreachable")

    async def read(self, stream_id: str) -> StoredStream | None:
        return await self._reading(load_one, self.st, stream_id)

    async def list_streams(self) -> list[StoredStream]:
        return await self._reading(_list_all, self.st)

    async def compact(self) -> None:
        """VACUUM the journal's tables (on the reader's connection: a VACUUM
        does not block the writer's inserts), then measure them again."""
        async def vacuum(conn: asyncpg.Connection) -> int:
            await conn.execute(self.st.vacuum)
            return int(await conn.fetchval(self.st.size, self.schema))

        self._size = await self._reading(vacuum)
