"""Faults of the filesystem under the journal, made real: a full 1 MiB tmpfs
and files made immutable (chattr +i stops root's writes too, even through
descriptors opened before). While commits fail, ``failure`` says why and the
futures stay pending; once the fault is lifted the same writes commit, and
nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator_service._journal import Append, Entry, OpenStream, StoreError, StreamKind

from .conftest import OpenStore, fill, immutable, settled, wait_for


def opened(sid: str) -> OpenStream:
    return OpenStream(sid, StreamKind.DIRECTIVE, b"h", 1.0)


async def test_disk_full_is_resource_exhausted_until_space_is_freed(make_store: OpenStore, small_fs: Path) -> None:
    path = small_fs / "journal.db"
    store, _ = await make_store(path)
    await settled(store.write([opened("s"), Append([Entry("s", 1, b"acknowledged")])]))
    filler = fill(small_fs)
    big = store.write([Append([Entry("s", 2, b"b" * 200_000)])])
    after = store.write([Append([Entry("s", 3, b"after")])])
    assert big is not None and after is not None
    failure = await wait_for(lambda: store.failure, what="the commit to fail")
    assert (failure.code, failure.message) == ("RESOURCE_EXHAUSTED", f"journal {path}: disk full")
    await wait_for(lambda: store.stats.failed_commits >= 3, what="retries")
    assert not big.done() and not after.done()
    filler.unlink()
    await settled(big)
    await settled(after)
    assert store.failure is None
    await store.close()
    _, recovered = await make_store(path)
    assert recovered.streams[0].entries == [(1, b"acknowledged"), (2, b"b" * 200_000), (3, b"after")]


async def test_close_while_the_disk_is_full_fails_what_is_pending(make_store: OpenStore, small_fs: Path) -> None:
    path = small_fs / "journal.db"
    store, _ = await make_store(path, close_timeout=0.3)
    await settled(store.write([opened("s"), Append([Entry("s", 1, b"acknowledged")])]))
    filler = fill(small_fs)
    pending = store.write([Append([Entry("s", 2, b"p" * 200_000)])])
    await wait_for(lambda: store.failure, what="the commit to fail")
    await asyncio.wait_for(store.close(), 5)
    assert pending is not None and pending.done()
    with pytest.raises(StoreError, match="disk full"):
        pending.result()
    filler.unlink()
    _, recovered = await make_store(path)
    assert recovered.streams[0].entries == [(1, b"acknowledged")]  # and nothing half-written


async def test_an_unwritable_journal_is_unavailable_until_it_is_writable(make_store: OpenStore, immutable_dir: Path) -> None:
    path = immutable_dir / "journal.db"
    store, _ = await make_store(path)
    await settled(store.write([opened("s"), Append([Entry("s", 1, b"acknowledged")])]))
    with immutable(path, Path(f"{path}-wal")) as lift:
        pending = store.write([Append([Entry("s", 2, b"pending")])])
        assert pending is not None
        failure = await wait_for(lambda: store.failure, what="the commit to fail")
        assert failure.code == "UNAVAILABLE"
        # the write(2) fails with EPERM, which SQLite reports as an I/O error
        assert failure.message == f"journal {path}: disk I/O error (SQLITE_IOERR_WRITE)"
        await wait_for(lambda: store.stats.failed_commits >= 3, what="retries")
        assert not pending.done()
        lift()
        await settled(pending)
    assert store.failure is None
    await store.close()
    _, recovered = await make_store(path)
    assert recovered.streams[0].entries == [(1, b"acknowledged"), (2, b"pending")]


async def test_opening_an_unwritable_journal_fails_with_the_reason(make_store: OpenStore, immutable_dir: Path) -> None:
    path = immutable_dir / "journal.db"
    store, _ = await make_store(path)
    await store.close()
    with immutable(path):
        with pytest.raises(StoreError) as caught:
            await make_store(path)
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.message.startswith(f"journal {path}: attempt to write a readonly database")
    _, recovered = await make_store(path)  # the failed open let go of the lock
    assert recovered.epoch == 2


async def test_a_journal_in_an_unwritable_directory_fails_to_open(make_store: OpenStore, immutable_dir: Path) -> None:
    with immutable(immutable_dir):
        with pytest.raises(StoreError) as caught:
            await make_store(immutable_dir / "journal.db")
    assert caught.value.code == "UNAVAILABLE"
    assert caught.value.message == (f"journal {immutable_dir / 'journal.db'}: cannot create "
                                    f"{immutable_dir / 'journal.db.lock'}: Operation not permitted")
