"""The journal's semantics, the same on both durable backends (SQLite files,
a real Postgres): every write op round-trips through a reopen, order holds
across commits, futures resolve in write() order, epochs increase, misuse
is refused where the caller sees it; and each backend's compaction."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from orchestrator_service._journal import (
    Append,
    Entry,
    FinishStream,
    OpenStream,
    PostgresStore,
    RemoveStream,
    SqliteStore,
    StoredStream,
    StoreError,
    StreamKind,
)

from .conftest import Journal, OpenPg, OpenStore, settled, wait_for


def opened(sid: str, kind: StreamKind = StreamKind.DIRECTIVE, detached: bool = False) -> OpenStream:
    return OpenStream(sid, kind, header=f"plan of {sid}".encode(), created_at=100.5, detached=detached)


async def test_every_op_round_trips_through_a_reopen(journal: Journal) -> None:
    store, recovered = await journal.open()
    assert recovered.streams == [] and recovered.epoch == 1 and store.durable
    await settled(store.write([
        opened("d1"),
        opened("c1", StreamKind.CHANNEL, detached=True),
        Append([Entry("d1", 1, b"inputs 0..511"), Entry("c1", 7, b""), Entry("d1", 2, b"\x00\xff")]),
        opened("gone"),
        Append([Entry("gone", 1, b"x" * 1000)]),
    ]))
    await settled(store.write([FinishStream("d1", 200.25, b"summary"), RemoveStream("gone")]))
    await store.close()

    _, recovered = await journal.open()
    assert recovered.epoch == 2
    assert recovered.streams == [
        StoredStream("d1", StreamKind.DIRECTIVE, b"plan of d1", 100.5, False, 200.25, b"summary",
                     [(1, b"inputs 0..511"), (2, b"\x00\xff")]),
        StoredStream("c1", StreamKind.CHANNEL, b"plan of c1", 100.5, True, None, None, [(7, b"")]),
    ]
    assert isinstance(recovered.streams[0].kind, StreamKind)
    assert recovered.seconds > 0


async def test_read_and_list_see_committed_state(journal: Journal) -> None:
    store, _ = await journal.open()
    assert await store.read("nope") is None
    await settled(store.write([opened("a"), Append([Entry("a", 1, b"one")])]))
    await settled(store.write([opened("b"), Append([Entry("a", 1, b"two")])]))
    got = await store.read("a")
    assert got is not None and got.entries == [(1, b"one"), (1, b"two")]
    listed = await store.list_streams()
    assert [s.stream_id for s in listed] == ["a", "b"]
    assert all(s.entries == [] for s in listed)
    await settled(store.write([FinishStream("b", 3.0, b"end")]))
    listed = await store.list_streams()
    assert (listed[1].finished_at, listed[1].summary) == (3.0, b"end")


async def test_order_holds_across_commits_and_futures_resolve_in_order(journal: Journal) -> None:
    store, _ = await journal.open()
    await settled(store.write([opened("s"), opened("t")]))
    resolved: list[int] = []
    futures = []
    for i in range(2000):  # queued faster than one commit: many per transaction
        future = store.write([Append([Entry("s" if i % 3 else "t", i % 5, str(i).encode())])])
        assert future is not None
        future.add_done_callback(lambda _, i=i: resolved.append(i))
        futures.append(future)
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert resolved == list(range(2000))
    assert store.stats.commits < 2000, "nothing was group-committed"
    assert store.stats.writes == 2001 and store.stats.entries == 2000
    s, t = await store.read("s"), await store.read("t")
    assert s is not None and t is not None
    assert s.entries == [(i % 5, str(i).encode()) for i in range(2000) if i % 3]
    assert t.entries == [(i % 5, str(i).encode()) for i in range(2000) if not i % 3]


async def test_a_resolved_future_means_every_earlier_write_is_committed(journal: Journal) -> None:
    store, _ = await journal.open()
    await settled(store.write([opened("s")]))
    futures = [store.write([Append([Entry("s", 0, bytes([i % 256]) * 100)])]) for i in range(300)]
    await settled(futures[150])
    # another connection, as a new process would see the journal
    assert await journal.count_entries() >= 151
    await asyncio.gather(*futures)  # type: ignore[arg-type]


async def test_a_transaction_is_capped_but_a_write_is_never_split(journal: Journal) -> None:
    store, _ = await journal.open()
    store.max_batch_bytes = 10_000
    observed: list[tuple[int, int, int]] = []
    store.stats.observers.append(lambda s, w, e, b: observed.append((w, e, b)))
    await settled(store.write([opened("s")]))
    futures = [store.write([Append([Entry("s", 0, b"x" * 3000)] * 2)]) for _ in range(20)]
    await asyncio.gather(*futures)  # type: ignore[arg-type]
    # observers run on the writer thread just after the futures are resolved
    await wait_for(lambda: sum(w for w, _, _ in observed) == 21, what="21 writes observed")
    assert observed[0] == (1, 0, 0)  # the OpenStream
    del observed[0]
    assert all(e == 2 * w and b == 6000 * w for w, e, b in observed)
    assert max(b for _, _, b in observed) < 10_000 + 6000


async def test_each_open_takes_the_next_epoch(journal: Journal) -> None:
    for expected in (1, 2, 3):
        store, recovered = await journal.open()
        assert recovered.epoch == expected
        await store.close()


async def test_misuse_is_refused_at_write_and_queues_nothing(journal: Journal) -> None:
    store, _ = await journal.open()
    await settled(store.write([opened("a")]))
    cases = [
        ([Append([Entry("ghost", 1, b"")])], "append to stream 'ghost', which is not open"),
        ([opened("a")], "stream 'a' is open already"),
        ([FinishStream("ghost", 1.0, b"")], "stream 'ghost' is not open"),
        ([opened("b"), RemoveStream("b"), Append([Entry("b", 1, b"")])], "'b', which is not open"),
        ([opened("c"), RemoveStream("a"), RemoveStream("a")], "stream 'a' is not open"),
    ]
    for ops, message in cases:
        with pytest.raises(StoreError, match=message) as caught:
            store.write(ops)
        assert caught.value.code == "FAILED_PRECONDITION"
    with pytest.raises(TypeError, match="not a journal write"):
        store.write(["nonsense"])  # type: ignore[list-item]
    assert store.write([]) is None
    # the refused writes changed nothing: b and c never opened, a still is
    await settled(store.write([opened("b"), opened("c"), Append([Entry("a", 1, b"ok")])]))
    assert [s.stream_id for s in await store.list_streams()] == ["a", "b", "c"]


async def test_a_stream_can_be_opened_again_after_removal(journal: Journal) -> None:
    store, _ = await journal.open()
    await settled(store.write([opened("a"), Append([Entry("a", 1, b"old")]), opened("b")]))
    await settled(store.write([RemoveStream("a"), opened("a"), Append([Entry("a", 1, b"new")])]))
    await store.close()
    _, recovered = await journal.open()
    assert [(s.stream_id, s.entries) for s in recovered.streams] == [("b", []), ("a", [(1, b"new")])]


async def test_closed_store_refuses_and_close_is_idempotent(journal: Journal) -> None:
    store, _ = await journal.open()
    future = store.write([opened("a")])
    await store.close()
    assert future is not None and future.done() and future.result() is None
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        store.write([opened("b")])
    with pytest.raises(StoreError, match="is closed"):
        await store.read("a")
    with pytest.raises(StoreError, match="is closed"):
        await store.open()


async def test_remove_and_compact_give_the_space_back(make_store: OpenStore) -> None:
    store, _ = await make_store()
    blob = bytes(range(256)) * 256  # 64 KiB, incompressible enough
    for i in range(40):
        await settled(store.write([opened(f"d{i}"), Append([Entry(f"d{i}", 1, blob)] * 4)]))
    await store.compact()
    full = store.stats.journal_bytes()
    assert full > 40 * 4 * len(blob)
    await settled(store.write([RemoveStream(f"d{i}") for i in range(38)]))
    await store.compact()
    await wait_for(lambda: store.stats.journal_bytes() < full // 10, what="the file to shrink")
    kept = await store.read("d39")
    assert kept is not None and kept.entries == [(1, blob)] * 4


async def test_synchronous_comes_from_the_url_or_the_keyword(make_store: OpenStore, tmp_path: Path) -> None:
    store, _ = await make_store(f"sqlite://{tmp_path}/a.db?synchronous=full")
    assert store.synchronous == "full"
    store, _ = await make_store(tmp_path / "b.db", synchronous="full")
    assert store.synchronous == "full"
    store, _ = await make_store(tmp_path / "c.db")
    assert store.synchronous == "normal"
    level = await asyncio.to_thread(lambda: store._conn.execute("PRAGMA synchronous").fetchone())  # type: ignore[union-attr]
    assert level == (1,)  # NORMAL
    with sqlite3.connect(tmp_path / "c.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)  # incremental


def test_an_unopened_store_is_not_written(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "j.db"))
    with pytest.raises(StoreError, match="is new"):
        store.write([opened("a")])


async def test_postgres_compact_makes_the_space_of_removed_streams_reusable(make_pg: OpenPg) -> None:
    store, _ = await make_pg()
    blob = random.Random(7).randbytes(64 << 10)  # incompressible: TOAST keeps it whole
    for i in range(40):
        await settled(store.write([opened(f"d{i}"), Append([Entry(f"d{i}", 1, blob)] * 4)]))
    await store.compact()
    full = store.stats.journal_bytes()
    assert full > 40 * 4 * len(blob)
    await settled(store.write([RemoveStream(f"d{i}") for i in range(38)]))
    await store.compact()
    for i in range(38):  # as much again: it goes where the removed streams were
        await settled(store.write([opened(f"e{i}"), Append([Entry(f"e{i}", 1, blob)] * 4)]))
    await store.compact()
    assert store.stats.journal_bytes() < full * 1.25
    kept = await store.read("d39")
    assert kept is not None and kept.entries == [(1, blob)] * 4


def test_an_unopened_postgres_store_is_not_written() -> None:
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="is new"):
        store.write([opened("a")])
