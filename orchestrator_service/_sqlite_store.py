"""The SQLite journal: one file in WAL mode, group-committed by one thread.

- ``write()`` runs on the event loop and only checks the ops against the set
  of open streams, makes a future and puts both on a queue: the loop never
  waits for SQLite.
- The writer thread (its own connection) takes everything queued since its
  last commit — up to ``max_batch_bytes`` of payload or ``max_batch_writes``
  writes, then the next transaction — and commits it as one transaction, so
  an idle store commits a lone write at once and a busy one commits large
  batches; then it resolves the batch's futures, in order, with one
  ``call_soon_threadsafe``. A write() is never split between transactions.
- A commit that fails with ``sqlite3.OperationalError`` (disk full, read-only,
  I/O error) is rolled back, sets ``failure`` and is retried, the same batch,
  with backoff from 0.05 s doubling to 2 s, until it commits; its futures stay
  pending meanwhile, so nothing is acknowledged that is not committed. Any
  other ``sqlite3.Error`` (a corrupt file) cannot get better by waiting: its
  futures fail with the error.
- ``read`` and ``list_streams`` run on a reader thread with a second
  connection, which under WAL sees the last committed transaction and never
  blocks the writer. ``compact`` goes through the writer's queue: it writes.
- The leader lease is the flock: this process leads from ``open()`` to
  ``close()`` (``_sole_leader``).
- ``synchronous=NORMAL`` (the default) loses nothing committed when the
  process dies; ``FULL`` adds an fsync per commit, for power loss.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from orchestrator_service import _sqlite_file as sf
from orchestrator_service._journal_types import (
    Append,
    Recovered,
    StoredStream,
    StoreError,
    StoreState,
    StoreStats,
    Write,
    check_writes,
)
from orchestrator_service._sole_leader import SoleLeader

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0


@dataclass(slots=True)
class _Compact:
    future: asyncio.Future[None]


@dataclass(slots=True)
class _Stop:
    pass


_Queued = tuple[Sequence[Write], "asyncio.Future[None]"] | _Compact | _Stop


def _resolve(futures: list[asyncio.Future[None]], error: StoreError | None) -> None:
    for future in futures:
        if future.done():  # cancelled by its caller
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class SqliteStore(SoleLeader):
    durable = True
    shared = False

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        synchronous: str = "normal",
        close_timeout: float = 5.0,
        max_batch_bytes: int = 8 << 20,
        max_batch_writes: int = 10_000,
    ) -> None:
        self.path = os.path.abspath(path)
        self.url = url or f"sqlite://{self.path}"
        self.synchronous = synchronous
        self.close_timeout = close_timeout
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_writes = max_batch_writes
        self.stats = StoreStats(size=lambda: sf.journal_bytes(self.path))
        self.state = StoreState.NEW
        self._lock = sf.JournalLock(self.path)
        self._queue: queue.SimpleQueue[_Queued] = queue.SimpleQueue()
        self._open: set[str] = set()  # streams open once every queued write commits
        self._failure: StoreError | None = None
        self._close_deadline: float | None = None
        self._wake = threading.Event()  # set by close(): cut a retry's backoff short
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None  # the writer's
        self._reader_conn: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._init_lease()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r}, {self.state.value})"

    # -- lifecycle -------------------------------------------------------------

    async def _open_journal(self) -> Recovered:
        if self.state is not StoreState.NEW:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.path} is {self.state.value}")
        self._loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            epoch, streams = await asyncio.to_thread(self._open_file)
        except BaseException:
            self.state = StoreState.CLOSED
            raise
        self._open = {s.stream_id for s in streams}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="squire-journal-read")
        try:
            self._reader_conn = await self._reading(lambda: sf.connect(self.path))
        except BaseException:
            self._reader.shutdown(wait=False)
            assert self._conn is not None
            self._conn.close()
            self._lock.release()
            self.state = StoreState.CLOSED
            raise
        self._writer = threading.Thread(target=self._run, name="squire-journal-write")
        self._writer.start()
        self.state = StoreState.OPEN
        return Recovered(epoch, streams, time.perf_counter() - started)

    def _open_file(self) -> tuple[int, list[StoredStream]]:
        self._lock.acquire()
        conn: sqlite3.Connection | None = None
        try:
            sf.check_header(self.path)
            try:
                conn = sf.connect(self.path)
            except sqlite3.Error as exc:
                raise sf.classify(exc, self.path) from exc
            sf.prepare(conn, self.path, self.synchronous)
            epoch = sf.next_epoch(conn, self.path)
            streams = sf.load_all(conn)
        except BaseException:
            if conn is not None:
                conn.close()
            self._lock.release()
            raise
        self._conn = conn
        return epoch, streams

    async def close(self) -> None:
        """Commit everything queued (retrying failures for up to
        ``close_timeout`` seconds, then failing what is left with the
        error), close both connections, release the lock. Idempotent."""
        if self.state is StoreState.NEW:
            self.state = StoreState.CLOSED
        if self.state is StoreState.CLOSED:
            return
        if self.state is StoreState.OPEN:
            self.state = StoreState.CLOSING
            self._close_deadline = time.monotonic() + self.close_timeout
            self._queue.put(_Stop())
            self._wake.set()
        assert self._writer is not None and self._reader is not None
        await asyncio.to_thread(self._writer.join)
        if self.state is StoreState.CLOSED:  # a concurrent close() finished first
            return
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)
        if self._conn is not None:
            self._conn.close()  # the last connection: SQLite checkpoints and removes the WAL
        self._lock.release()
        self.state = StoreState.CLOSED

    def _close_reader(self) -> None:
        if self._reader_conn is not None:
            self._reader_conn.close()

    # -- the write path ----------------------------------------------------------

    def write(self, ops: Sequence[Write]) -> asyncio.Future[None] | None:
        if self.state is not StoreState.OPEN:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.path} is {self.state.value}")
        if not ops:
            return None
        check_writes(self._open, ops)
        assert self._loop is not None
        future = self._loop.create_future()
        self._queue.put((ops, future))
        return future

    def _run(self) -> None:
        """The writer thread: drain, commit, resolve, until told to stop."""
        while True:
            item: _Queued | None = self._queue.get()
            writes: list[Sequence[Write]] = []
            futures: list[asyncio.Future[None]] = []
            entries = nbytes = 0
            while isinstance(item, tuple):
                ops, future = item
                writes.append(ops)
                futures.append(future)
                for op in ops:
                    if type(op) is Append:
                        entries += len(op.entries)
                        nbytes += sum([len(e.payload) for e in op.entries])
                if len(writes) >= self.max_batch_writes or nbytes >= self.max_batch_bytes:
                    item = None
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if writes:
                self._commit(writes, futures, entries, nbytes)
            if isinstance(item, _Compact):
                self._compact(item.future)
            elif isinstance(item, _Stop):
                return

    def _commit(self, writes: list[Sequence[Write]], futures: list[asyncio.Future[None]],
                entries: int, nbytes: int) -> None:
        assert self._conn is not None
        conn, stats = self._conn, self.stats
        delay = BACKOFF_FIRST
        while True:
            started = time.perf_counter()
            try:
                conn.execute("BEGIN")
                sf.apply(conn, writes)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                sf.rollback(conn)
                error = sf.classify(exc, self.path)
                stats.failed_commits += 1
                if self._failure is None:
                    log.error("%s; retrying until it commits", error.message)
                self._failure = error
                if not isinstance(exc, sqlite3.OperationalError) or self._past_deadline():
                    self._settle(futures, error)
                    return
                if self._close_deadline is None:
                    self._wake.wait(delay)
                else:
                    time.sleep(max(0.0, min(delay, self._close_deadline - time.monotonic())))
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            seconds = time.perf_counter() - started
            if self._failure is not None:
                log.warning("journal %s: commits succeed again", self.path)
            self._failure = None
            stats.commits += 1
            stats.writes += len(writes)
            stats.entries += entries
            stats.bytes += nbytes
            stats.last_commit_seconds = seconds
            stats.total_commit_seconds += seconds
            self._settle(futures, None)
            for observe in stats.observers:
                try:
                    observe(seconds, len(writes), entries, nbytes)
                except Exception:
                    log.exception("a journal commit observer failed")
            return

    def _past_deadline(self) -> bool:
        return self._close_deadline is not None and time.monotonic() >= self._close_deadline

    def _settle(self, futures: list[asyncio.Future[None]], error: StoreError | None) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_resolve, futures, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # -- reads and maintenance ----------------------------------------------------

    @property
    def failure(self) -> StoreError | None:
        return self._failure

    async def read(self, stream_id: str) -> StoredStream | None:
        conn = await self._reader_ready()
        return await self._reading(lambda: sf.load_one(conn, stream_id))

    async def list_streams(self) -> list[StoredStream]:
        conn = await self._reader_ready()
        return await self._reading(lambda: sf.list_all(conn))

    async def _reader_ready(self) -> sqlite3.Connection:
        if self.state is not StoreState.OPEN:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.path} is {self.state.value}")
        assert self._reader_conn is not None
        return self._reader_conn

    async def _reading(self, fn: Callable[[], T]) -> T:
        """``fn`` on the reader thread; its connection is used there only."""
        assert self._reader is not None
        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, fn)
        except sqlite3.Error as exc:
            raise sf.classify(exc, self.path) from exc

    async def compact(self) -> None:
        if self.state is not StoreState.OPEN:
            raise StoreError("FAILED_PRECONDITION", f"journal {self.path} is {self.state.value}")
        assert self._loop is not None
        future = self._loop.create_future()
        self._queue.put(_Compact(future))
        await future

    def _compact(self, future: asyncio.Future[None]) -> None:
        assert self._conn is not None
        try:
            sf.compact(self._conn)
        except sqlite3.Error as exc:
            self._settle([future], sf.classify(exc, self.path))
        else:
            self._settle([future], None)
