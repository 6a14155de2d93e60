"""What open() refuses and how store URLs are read: files that are not
SQLite, SQLite files that are not Squire's or are from a newer Squire, the
accepted URL forms; and the memory: store's semantics."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator_service._journal import (
    Append,
    Entry,
    MemoryStore,
    OpenStream,
    SqliteStore,
    StoreIncompatible,
    StreamKind,
    open_store,
    parse_store_url,
)
from orchestrator_service._sqlite_file import APPLICATION_ID, SCHEMA_VERSION

from .conftest import OpenStore


async def test_a_file_that_is_not_sqlite_is_refused(make_store: OpenStore, tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("shopping list: eggs, milk, a journal\n" * 10)
    with pytest.raises(StoreIncompatible, match=rf"journal {path} is not a SQLite database") as caught:
        await make_store(path)
    assert caught.value.code == "FAILED_PRECONDITION"
    assert path.read_text().startswith("shopping list")  # untouched


async def test_an_empty_file_is_initialised(make_store: OpenStore, tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    _, recovered = await make_store(path)
    assert recovered.epoch == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_another_applications_database_is_refused(make_store: OpenStore, tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    with pytest.raises(StoreIncompatible, match=rf"journal {path} is not a Squire journal: "
                       r"application_id 0x0 \(Squire's is 0x53515245\) and 1 tables"):
        await make_store(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA application_id = 1234")
    with pytest.raises(StoreIncompatible, match=r"application_id 0x4d2"):
        await make_store(path)
    with sqlite3.connect(path) as conn:  # still the other application's, unchanged
        assert conn.execute("SELECT name FROM sqlite_schema").fetchall() == [("invoices",)]


async def test_a_journal_from_a_newer_squire_is_refused(make_store: OpenStore, tmp_path: Path) -> None:
    store, _ = await make_store()
    await store.close()
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreIncompatible, match=rf"has schema version {SCHEMA_VERSION + 1}, "
                       rf"newer than this Squire reads \(up to {SCHEMA_VERSION}\)"):
        await make_store()
    # a refused open released the lock: after a downgrade back, it opens
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    _, recovered = await make_store()
    assert recovered.epoch == 2


@pytest.mark.parametrize(("url", "path", "synchronous"), [
    ("sqlite:///var/lib/squire/journal.db", "/var/lib/squire/journal.db", None),
    ("sqlite://state/journal.db", "state/journal.db", None),
    ("sqlite:///j.db?synchronous=full", "/j.db", "full"),
    ("sqlite:///j.db?synchronous=NORMAL", "/j.db", "normal"),
    ("journal.db", "journal.db", None),
    ("/abs/journal.db", "/abs/journal.db", None),
])
def test_sqlite_urls(url: str, path: str, synchronous: str | None) -> None:
    parsed = parse_store_url(url)
    assert (parsed.scheme, parsed.path, parsed.synchronous) == ("sqlite", path, synchronous)


@pytest.mark.parametrize(("url", "why"), [
    ("postgres://", "no host"),
    ("postgresql://db/squire?schema=Jobs-1", "schema must be a lower-case SQL identifier "
     "(letters, digits, _), not 'Jobs-1'"),
    ("mysql://db/squire", "not a store URL"),
    ("journal.sqlite", "not a store URL"),
    ("memory", "not a store URL"),
    ("", "not a store URL"),
    ("sqlite://", "no file path"),
    ("sqlite:///j.db?synchronous=off", "synchronous must be one of normal, full, not 'off'"),
    ("sqlite:///j.db?mode=ro", "unknown parameter 'mode'"),
])
def test_bad_urls_name_the_url_and_the_accepted_forms(url: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        open_store(url)
    message = str(caught.value)
    assert message.startswith(f"store URL {url!r}: {why}; accepted forms: memory:, sqlite:///")
    assert "a bare path ending in .db" in message


def test_open_store_picks_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_store("memory:"), MemoryStore)
    store = open_store(f"sqlite://{tmp_path}/j.db")
    assert isinstance(store, SqliteStore) and store.path == f"{tmp_path}/j.db"
    assert store.url == f"sqlite://{tmp_path}/j.db"
    with pytest.raises(ValueError, match="synchronous must be one of normal, full, not 'extra'"):
        open_store("j.db", synchronous="extra")


async def test_the_memory_store_stores_nothing_and_commits_at_once() -> None:
    store = open_store("memory:")
    assert not store.durable and store.url == "memory:"
    recovered = await store.open()
    assert (recovered.epoch, recovered.streams) == (1, [])
    ops = [OpenStream("d", StreamKind.DIRECTIVE, b"h", 1.0), Append([Entry("d", 1, b"x")])]
    assert store.write(ops) is None
    assert await store.read("d") is None
    assert await store.list_streams() == []
    assert store.failure is None
    await store.compact()
    assert store.stats.journal_bytes() == 0
    await store.close()
    again = open_store("memory:")
    assert (await again.open()).epoch == 1  # nothing, not even the epoch, outlives it
    await again.close()
