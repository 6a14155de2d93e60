"""The journal: where accepted directives, their inputs and their completed
outcomes are committed before anyone is told so (issue 15).

``open_store(url)`` picks the implementation of the ``Store`` protocol:

- ``memory:`` — the null journal: nothing is stored, every write commits at
  once, ``durable`` is False (``_memory_store``);
- ``sqlite:///abs/path/journal.db``, ``sqlite://relative/path.db`` or a bare
  path ending ``.db`` — an embedded SQLite file in WAL mode
  (``_sqlite_store``); ``?synchronous=full`` survives power loss as well as
  process kills, at the price of an fsync per commit;
- ``postgresql://user@host:port/database`` (or ``postgres://``), optionally
  ``?schema=NAME`` — a Postgres database that several orchestrator replicas
  share, one of them leading at a time (``_postgres_store``); the password
  comes from ``SQUIRE_STORE_PASSWORD_FILE``, ``SQUIRE_STORE_PASSWORD`` or
  ``PGPASSWORD``, never needed in the URL.

The values, errors and the protocol itself are defined in ``_journal_types``
(no I/O, so the routing core may import them) and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator_service._journal_types import (
    Append,
    CommitObserver,
    Entry,
    ErrorCode,
    FinishStream,
    Leader,
    OpenStream,
    Recovered,
    RemoveStream,
    Store,
    StoredStream,
    StoreError,
    StoreFenced,
    StoreIncompatible,
    StoreInUse,
    StoreState,
    StoreStats,
    StreamKind,
    Write,
)
from orchestrator_service._memory_store import MemoryStore
from orchestrator_service._postgres_conn import parse_postgres_url
from orchestrator_service._postgres_store import PostgresStore
from orchestrator_service._sqlite_store import SqliteStore

__all__ = [
    "Append",
    "CommitObserver",
    "Entry",
    "ErrorCode",
    "FinishStream",
    "Leader",
    "MemoryStore",
    "OpenStream",
    "PostgresStore",
    "Recovered",
    "RemoveStream",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreFenced",
    "StoreInUse",
    "StoreIncompatible",
    "StoreState",
    "StoreStats",
    "StoredStream",
    "StreamKind",
    "Write",
    "open_store",
    "parse_store_url",
]

ACCEPTED = (
    "memory:, sqlite:///absolute/path/journal.db, sqlite://relative/path/journal.db "
    "(either with ?synchronous=normal|full), a bare path ending in .db, "
    "or postgresql://user@host:port/database (postgres:// too; ?schema=name)"
)
SYNCHRONOUS = ("normal", "full")


@dataclass(frozen=True, slots=True)
class StoreURL:
    scheme: str  # "memory" | "sqlite" | "postgresql"
    path: str = ""  # the SQLite file, as written (relative paths are the caller's cwd),
    #                 or the whole Postgres URL
    synchronous: str | None = None  # from the URL's query, if it named one


def parse_store_url(url: str) -> StoreURL:
    def bad(why: str) -> ValueError:
        return ValueError(f"store URL {url!r}: {why}; accepted forms: {ACCEPTED}")

    if url == "memory:":
        return StoreURL("memory")
    if url.startswith("sqlite://"):
        path, _, query = url.removeprefix("sqlite://").partition("?")
        if not path:
            raise bad("no file path")
        synchronous = None
        for pair in filter(None, query.split("&")):
            key, _, value = pair.partition("=")
            if key != "synchronous":
                raise bad(f"unknown parameter {key!r}")
            if value.lower() not in SYNCHRONOUS:
                raise bad(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {value!r}")
            synchronous = value.lower()
        return StoreURL("sqlite", path, synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            parse_postgres_url(url)
        except ValueError as exc:
            raise bad(str(exc).partition(": ")[2]) from None
        return StoreURL("postgresql", url)
    if url.endswith(".db") and "://" not in url and not url.endswith("/.db"):
        return StoreURL("sqlite", url)
    raise bad("not a store URL")


def open_store(
    url: str, *, synchronous: str = "normal", close_timeout: float = 5.0
) -> Store:
    """The store ``url`` names, not yet opened (``await store.open()``).
    A ``synchronous`` in the URL wins over the keyword (SQLite only);
    ``close_timeout`` bounds how long ``close()`` keeps retrying commits
    that fail."""
    parsed = parse_store_url(url)
    if parsed.scheme == "memory":
        return MemoryStore()
    if parsed.scheme == "postgresql":
        return PostgresStore(url, close_timeout=close_timeout)
    level = (parsed.synchronous or synchronous).lower()
    if level not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {level!r}")
    return SqliteStore(parsed.path, url=url, synchronous=level, close_timeout=close_timeout)
