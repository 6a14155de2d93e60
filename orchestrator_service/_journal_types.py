"""The journal's values, errors and the ``Store`` seam, without any I/O.

The routing core builds ``Write`` operations and reads ``Recovered`` state, so
they live here, importable by the core; the implementations (``_sqlite_store``,
``_memory_store``) and ``open_store`` live in modules that do I/O, and
``_journal`` re-exports all of it as the one name callers use.

Errors::

    StoreError            code: RESOURCE_EXHAUSTED | UNAVAILABLE | FAILED_PRECONDITION
    ├── StoreInUse        another live process holds this journal
    ├── StoreIncompatible not a Squire journal, or a schema this code cannot read
    └── StoreFenced       UNAVAILABLE: this process no longer holds the leader
                          lease (a newer epoch took it, or it lapsed); its
                          write changed nothing

The leader lease (``campaign``, ``leader``, ``resign``, ``lost``) is part of
every store: Postgres implements it for real (``_postgres_lease``); SQLite
and memory have one process by construction, which always leads with the
epoch ``open()`` takes (``_sole_leader``).

Payloads, headers and summaries are opaque bytes: the caller encodes them, and
one ``Entry`` normally carries a whole batch (of inputs, of task outcomes), so
a row is never a single task.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    import asyncio

ErrorCode = Literal["RESOURCE_EXHAUSTED", "UNAVAILABLE", "FAILED_PRECONDITION"]


class StreamKind(enum.IntEnum):
    DIRECTIVE = 1
    CHANNEL = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One record in a stream's log."""

    stream_id: str
    kind: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OpenStream:
    stream_id: str
    kind: StreamKind
    header: bytes
    created_at: float
    detached: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """Entries appended to their streams' logs, in order."""

    entries: Sequence[Entry]


@dataclass(frozen=True, slots=True)
class FinishStream:
    stream_id: str
    finished_at: float
    summary: bytes


@dataclass(frozen=True, slots=True)
class RemoveStream:
    """The stream's header and log are deleted (``compact`` reclaims the space)."""

    stream_id: str


Write = OpenStream | Append | FinishStream | RemoveStream


@dataclass(slots=True)
class StoredStream:
    stream_id: str
    kind: StreamKind
    header: bytes
    created_at: float
    detached: bool
    finished_at: float | None
    summary: bytes | None
    entries: list[tuple[int, bytes]] = field(default_factory=list)  # (kind, payload)


@dataclass(frozen=True, slots=True)
class Recovered:
    epoch: int  # this process's epoch: the previous one + 1, committed at open
    streams: list[StoredStream]  # in creation order, each with its whole log
    seconds: float  # how long open() took, lock to loaded state


class StoreError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class StoreInUse(StoreError):
    def __init__(self, message: str) -> None:
        super().__init__("FAILED_PRECONDITION", message)


class StoreIncompatible(StoreError):
    def __init__(self, message: str) -> None:
        super().__init__("FAILED_PRECONDITION", message)


class StoreFenced(StoreError):
    """A write (or renewal) of ``epoch`` found the lease at ``newer`` (None:
    it lapsed and nobody has taken it yet). Nothing of the write is kept."""

    def __init__(self, epoch: int, newer: int | None, message: str) -> None:
        super().__init__("UNAVAILABLE", message)
        self.epoch = epoch
        self.newer = newer


@dataclass(frozen=True, slots=True)
class Leader:
    """Who holds the leader lease: ``holder`` names the process, ``address``
    is where it serves (what a standby tells callers), ``epoch`` its term."""

    holder: str
    address: str
    epoch: int


DEFAULT_LEASE_TTL = 3.0  # seconds; renewed every ttl / 3


def check_writes(streams: set[str], ops: Sequence[Write]) -> None:
    """Refuse what the database would refuse mid-transaction, where the
    caller can see it, and track ``streams`` (those open once every queued
    write commits). On refusal nothing in ``streams`` changes."""
    undo: list[tuple[bool, str]] = []  # (was added, stream id)
    try:
        for op in ops:
            if type(op) is Append:
                if not streams.issuperset([e.stream_id for e in op.entries]):
                    missing = next(e for e in op.entries if e.stream_id not in streams)
                    raise StoreError("FAILED_PRECONDITION", f"append to stream "
                                     f"{missing.stream_id!r}, which is not open")
            elif type(op) is OpenStream:
                if op.stream_id in streams:
                    raise StoreError("FAILED_PRECONDITION",
                                     f"stream {op.stream_id!r} is open already")
                streams.add(op.stream_id)
                undo.append((True, op.stream_id))
            elif type(op) is FinishStream or type(op) is RemoveStream:
                if op.stream_id not in streams:
                    raise StoreError("FAILED_PRECONDITION",
                                     f"stream {op.stream_id!r} is not open")
                if type(op) is RemoveStream:
                    streams.discard(op.stream_id)
                    undo.append((False, op.stream_id))
            else:
                raise TypeError(f"not a journal write: {op!r}")
    except BaseException:
        for added, sid in reversed(undo):
            (streams.discard if added else streams.add)(sid)
        raise


# Called on the writer thread after each transaction with (seconds, writes,
# entries, payload bytes): keep it quick and thread-safe (a Prometheus
# ``Histogram.observe`` is both).
CommitObserver = Callable[[float, int, int, int], None]


def _no_size() -> int:
    return 0


@dataclass(slots=True)
class StoreStats:
    """Counters of committed work. The writer thread updates them; the event
    loop reads them (plain attribute reads, each consistent on its own)."""

    commits: int = 0  # transactions
    writes: int = 0  # write() calls committed
    entries: int = 0
    bytes: int = 0  # entry payload bytes
    last_commit_seconds: float = 0.0
    total_commit_seconds: float = 0.0
    failed_commits: int = 0  # attempts rolled back (each retried)
    observers: list[CommitObserver] = field(default_factory=list)
    size: Callable[[], int] = _no_size

    def journal_bytes(self) -> int:
        """Bytes the journal takes on disk (database file + write-ahead log)."""
        return self.size()


class StoreState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Store(Protocol):
    url: str
    durable: bool
    # Several orchestrators may use it at once: one leads (``campaign``), the
    # others stand by. False: one process by construction, always the leader.
    shared: bool
    stats: StoreStats

    lost: asyncio.Event  # set once this process's leadership ended (never, for one process)

    async def open(self) -> Recovered:
        """Lock the journal, create or migrate its schema, commit a new epoch
        and load everything. On a store with a lease, ``open()`` after
        ``campaign()`` loads under that epoch; without one it campaigns
        itself first (and so waits while another process leads)."""
        ...

    async def campaign(self, holder: str, address: str, ttl: float = DEFAULT_LEASE_TTL) -> int:
        """Wait until ``holder`` holds the leader lease; returns its epoch,
        one more than any before it. The lease is renewed every ``ttl / 3``
        from then on, until ``resign()``, ``close()`` or ``lost``."""
        ...

    async def leader(self) -> Leader | None:
        """Who holds the lease now, if anyone (an expired lease is nobody's)."""
        ...

    async def resign(self) -> None:
        """Commit what is queued, then give the lease up at once, so a
        standby takes over without waiting for the TTL. Sets ``lost``."""
        ...

    def write(self, ops: Sequence[Write]) -> asyncio.Future[None] | None:
        """Queue ``ops`` without blocking (call it on the event loop's thread).
        The future resolves, on the loop, once they are committed; commits
        follow write() order, so a resolved future implies every earlier
        write is committed. ``None`` means durable already or nothing to do.
        Misuse (an entry for a stream that is not open, a stream opened
        twice) raises ``StoreError('FAILED_PRECONDITION')`` and queues nothing."""
        ...

    async def read(self, stream_id: str) -> StoredStream | None:
        """The committed state of one stream, read off the loop."""
        ...

    async def list_streams(self) -> list[StoredStream]:
        """Every committed stream's header and summary; ``entries`` empty."""
        ...

    @property
    def failure(self) -> StoreError | None:
        """Set while commits fail (disk full, read-only): refuse new work."""
        ...

    async def compact(self) -> None:
        """Give the space of removed streams back to the filesystem."""
        ...

    async def close(self) -> None:
        """Commit every queued write, then release the journal."""
        ...
