"""The SQLite journal file: its lock, the checks that it is Squire's, the
schema and its migrations, and the statements the store runs. Everything here
is synchronous and runs on the store's threads, never on the event loop.

Schema (version 1)::

    meta     (key TEXT PRIMARY KEY, value)          -- 'epoch', 'created'
    streams  (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, kind, header, created_at,
              detached, finished_at, summary)        -- seq: creation order
    entries  (id INTEGER PRIMARY KEY, stream_id, kind, payload)
             + index entries_by_stream (stream_id)   -- id: global append order

``entries.id`` is a rowid, not AUTOINCREMENT: a new row always gets max + 1,
which orders appends as well, without the sqlite_sequence table. Ids of rows
deleted at the top may be reused; nothing outside the file ever sees an id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from collections.abc import Sequence
from operator import attrgetter

from orchestrator_service._journal_types import (
    Append,
    FinishStream,
    OpenStream,
    RemoveStream,
    StoredStream,
    StoreError,
    StoreIncompatible,
    StoreInUse,
    StreamKind,
    Write,
)

APPLICATION_ID = 0x53515245  # "SQRE": PRAGMA application_id of every Squire journal
SQLITE_MAGIC = b"SQLite format 3\x00"

# MIGRATIONS[v] takes a journal from schema version v to v + 1, in one transaction.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
        "INSERT INTO meta VALUES ('epoch', 0), ('created', CAST(strftime('%s', 'now') AS INT))",
        "CREATE TABLE streams (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
        " kind INTEGER NOT NULL, header BLOB NOT NULL, created_at REAL NOT NULL,"
        " detached INTEGER NOT NULL, finished_at REAL, summary BLOB)",
        "CREATE TABLE entries (id INTEGER PRIMARY KEY, stream_id TEXT NOT NULL,"
        " kind INTEGER NOT NULL, payload BLOB NOT NULL)",
        "CREATE INDEX entries_by_stream ON entries (stream_id)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

INSERT_ENTRY = "INSERT INTO entries (stream_id, kind, payload) VALUES (?, ?, ?)"
INSERT_STREAM = (
    "INSERT INTO streams (id, kind, header, created_at, detached) VALUES (?, ?, ?, ?, ?)"
)
FINISH_STREAM = "UPDATE streams SET finished_at = ?, summary = ? WHERE id = ?"
STREAM_COLUMNS = "id, kind, header, created_at, detached, finished_at, summary"
_ROW = attrgetter("stream_id", "kind", "payload")  # an Entry as its row, in C


class JournalLock:
    """An exclusive ``flock`` on ``<journal>.lock`` holding the owner's pid.
    The kernel drops it when the owner dies, however it dies, so a stale
    file never blocks; the file itself is left in place (unlinking a lock
    file races with the next owner)."""

    def __init__(self, journal: str) -> None:
        self.journal = journal
        self.path = journal + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(
                "UNAVAILABLE", f"journal {self.journal}: cannot create {self.path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError("UNAVAILABLE", f"journal {self.journal}: cannot lock "
                                 f"{self.path}: {exc.strerror}") from exc
            raise StoreInUse(
                f"journal {self.journal} is in use by another orchestrator (pid {holder}); "
                "two orchestrators must not share one SQLite journal"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit BEGINs)
    that may be handed between threads, used by one at a time."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def check_header(path: str) -> None:
    """A non-empty file that is not SQLite is refused before SQLite touches it."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError("UNAVAILABLE", f"journal {path}: cannot read: {exc.strerror}") from exc
    if head and head != SQLITE_MAGIC:
        raise StoreIncompatible(
            f"journal {path} is not a SQLite database (it begins {head[:16]!r}); "
            "point --store at a new file or at a Squire journal"
        )


def prepare(conn: sqlite3.Connection, path: str, synchronous: str) -> None:
    """Check the file is a Squire journal this code reads, set the pragmas,
    create or migrate the schema."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):
            raise classify(exc, path) from exc
        raise StoreIncompatible(f"journal {path} is not a SQLite database ({exc})") from exc
    if app_id != APPLICATION_ID and (app_id != 0 or objects):
        raise StoreIncompatible(
            f"journal {path} is not a Squire journal: application_id {app_id:#x} "
            f"(Squire's is {APPLICATION_ID:#x}) and {objects} tables or indexes; "
            "point --store at a new file or at a Squire journal"
        )
    if version > SCHEMA_VERSION:
        raise StoreIncompatible(
            f"journal {path} has schema version {version}, newer than this Squire reads "
            f"(up to {SCHEMA_VERSION}); run the Squire that wrote it or a newer one"
        )
    try:
        if not objects:  # only before the first table: it decides the file's layout
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError("UNAVAILABLE", f"journal {path}: cannot use WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = OFF")
        for v in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[v]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {v + 1}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
    except sqlite3.Error as exc:
        raise classify(exc, path) from exc


def next_epoch(conn: sqlite3.Connection, path: str) -> int:
    """Take the previous epoch + 1 and commit it."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            (epoch,) = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            conn.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (epoch + 1,))
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    except sqlite3.Error as exc:
        raise classify(exc, path) from exc
    return int(epoch) + 1


def _stream(row: tuple[str, int, bytes, float, int, float | None, bytes | None]) -> StoredStream:
    sid, kind, header, created_at, detached, finished_at, summary = row
    return StoredStream(sid, StreamKind(kind), header, created_at, bool(detached),
                        finished_at, summary, [])


def load_all(conn: sqlite3.Connection) -> list[StoredStream]:
    """Every stream with its log, in one read transaction (one snapshot)."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute(f"SELECT {STREAM_COLUMNS} FROM streams ORDER BY seq")
        streams = {s.stream_id: s for s in map(_stream, rows)}
        for sid, kind, payload in conn.execute(
            "SELECT stream_id, kind, payload FROM entries ORDER BY id"
        ):
            # RemoveStream deletes a stream and its entries in one transaction
            # and write() refuses entries for streams that are not open, so
            # every row has its stream.
            streams[sid].entries.append((kind, payload))
    finally:
        conn.execute("COMMIT")
    return list(streams.values())


def load_one(conn: sqlite3.Connection, stream_id: str) -> StoredStream | None:
    conn.execute("BEGIN")
    try:
        row = conn.execute(
            f"SELECT {STREAM_COLUMNS} FROM streams WHERE id = ?", (stream_id,)
        ).fetchone()
        if row is None:
            return None
        stream = _stream(row)
        stream.entries = conn.execute(
            "SELECT kind, payload FROM entries WHERE stream_id = ? ORDER BY id", (stream_id,)
        ).fetchall()
        return stream
    finally:
        conn.execute("COMMIT")


def list_all(conn: sqlite3.Connection) -> list[StoredStream]:
    rows = conn.execute(f"SELECT {STREAM_COLUMNS} FROM streams ORDER BY seq").fetchall()
    return list(map(_stream, rows))


def apply(conn: sqlite3.Connection, writes: Sequence[Sequence[Write]]) -> None:
    """Execute writes in order inside the caller's transaction. Runs of
    appends, even across write() calls, go to SQLite in one executemany."""
    run: list[object] = []
    for ops in writes:
        for op in ops:
            if type(op) is Append:
                run.extend(op.entries)
                continue
            if run:
                conn.executemany(INSERT_ENTRY, map(_ROW, run))
                run = []
            match op:
                case OpenStream():
                    conn.execute(INSERT_STREAM, (op.stream_id, int(op.kind), op.header,
                                                 op.created_at, int(op.detached)))
                case FinishStream():
                    conn.execute(FINISH_STREAM, (op.finished_at, op.summary, op.stream_id))
                case RemoveStream():
                    conn.execute("DELETE FROM entries WHERE stream_id = ?", (op.stream_id,))
                    conn.execute("DELETE FROM streams WHERE id = ?", (op.stream_id,))
    if run:
        conn.executemany(INSERT_ENTRY, map(_ROW, run))


def compact(conn: sqlite3.Connection) -> None:
    """Free pages go back to the filesystem (incremental vacuum writes the
    shrunk file into the WAL; the TRUNCATE checkpoint copies it into the
    database, truncates both)."""
    # execute() steps a statement without result columns once, and each step
    # of incremental_vacuum frees one page; executescript steps it to the end
    conn.executescript("PRAGMA incremental_vacuum;")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def rollback(conn: sqlite3.Connection) -> None:
    # after some errors (SQLITE_FULL among them) SQLite has already rolled back
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def classify(exc: sqlite3.Error, path: str) -> StoreError:
    """A failed statement as the status callers report."""
    name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    if name == "SQLITE_FULL":
        return StoreError("RESOURCE_EXHAUSTED", f"journal {path}: disk full")
    return StoreError("UNAVAILABLE", f"journal {path}: {exc} ({name})")


def journal_bytes(path: str) -> int:
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(name).st_size
    return total
