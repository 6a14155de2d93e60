"""The leader lease on a real Postgres: one campaigner leads and the others
wait; resign hands over at once; a SIGKILLed leader's lease is taken within
its TTL with a higher epoch; a deposed leader's writes are fenced (refused by
the database, changing nothing), whether it learns from a write or from its
renewal after a SIGSTOP; open() loads under the lease's epoch. And the
trivial lease of the one-process stores."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import asyncpg
import pytest
from pg import PASSWORD

from orchestrator_service._journal import (
    Append,
    Entry,
    Leader,
    OpenStream,
    PostgresStore,
    StoreError,
    StoreFenced,
    StreamKind,
    open_store,
)

from .conftest import Spawn, next_line, pg_fetch, settled, tell

TTL = 1.5  # short for quick tests, long enough for a loaded machine


def opened(sid: str) -> OpenStream:
    return OpenStream(sid, StreamKind.DIRECTIVE, b"plan", 1.0)


@pytest.fixture
async def stores(pg_url: str):  # type: ignore[no-untyped-def]
    made: list[PostgresStore] = []

    def make() -> PostgresStore:
        made.append(PostgresStore(pg_url))
        return made[-1]

    yield make
    for store in made:
        await store.close()


async def test_one_campaigner_leads_the_other_waits_until_it_resigns(stores) -> None:  # type: ignore[no-untyped-def]
    a, b = stores(), stores()
    assert await a.leader() is None
    assert await a.campaign("a", "10.0.0.1:50051", TTL) == 1
    standby = asyncio.create_task(b.campaign("b", "10.0.0.2:50051", TTL))
    done, _ = await asyncio.wait([standby], timeout=3 * TTL)  # a renews: b keeps waiting
    assert not done
    assert await b.leader() == await a.leader() == Leader("a", "10.0.0.1:50051", 1)
    assert a._lease.renewals >= 2
    resigned = time.monotonic()
    await a.resign()
    assert await asyncio.wait_for(standby, 5) == 2
    assert time.monotonic() - resigned < 0.5  # a poll, not a TTL
    assert a.lost.is_set() and not b.lost.is_set()
    assert await a.leader() == Leader("b", "10.0.0.2:50051", 2)


async def test_open_loads_under_the_lease_epoch(stores) -> None:  # type: ignore[no-untyped-def]
    first = stores()
    assert await first.campaign("first", "", TTL) == 1
    recovered = await first.open()
    assert recovered.epoch == first.epoch == 1
    await settled(first.write([opened("d"), Append([Entry("d", 1, b"by epoch 1")])]))
    await first.close()  # resigns
    second = stores()
    recovered = await second.open()  # no campaign: open() takes the lease itself
    assert recovered.epoch == 2
    assert recovered.streams[0].entries == [(1, b"by epoch 1")]
    assert (await second.leader()).epoch == 2  # type: ignore[union-attr]


async def test_a_deposed_writer_is_fenced_by_the_database(stores, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    old, new = stores(), stores()
    await old.campaign("old", "", TTL)
    await old.open()
    await settled(old.write([opened("d"), Append([Entry("d", 1, b"acknowledged")])]))
    await old._lease.stop()  # frozen: it renews no more, and does not know it
    assert await asyncio.wait_for(new.campaign("new", "", TTL), 3 * TTL) == 2
    recovered = await new.open()
    assert recovered.streams[0].entries == [(1, b"acknowledged")]
    assert not old.lost.is_set()
    late = old.write([opened("late"), Append([Entry("d", 1, b"late")])])
    assert late is not None
    with pytest.raises(StoreFenced) as caught:
        await asyncio.wait_for(late, 5)
    assert (caught.value.code, caught.value.epoch, caught.value.newer) == ("UNAVAILABLE", 1, 2)
    assert caught.value.message == (
        f"journal {pg_url}: epoch 2 holds the leader lease now; this orchestrator's epoch 1 "
        "is fenced and its writes change nothing")
    assert old.lost.is_set() and old.failure is caught.value
    rows = await pg_fetch(pg_url, "SELECT (SELECT count(*) FROM squire.entries),"
                                  " (SELECT count(*) FROM squire.streams)")
    assert tuple(rows[0]) == (1, 1)  # the late write changed nothing
    # and every later write fails at once, without a round trip
    again = old.write([Append([Entry("d", 1, b"later")])])
    assert again is not None and again.done() and isinstance(again.exception(), StoreFenced)
    await settled(new.write([Append([Entry("d", 2, b"by epoch 2")])]))
    got = await new.read("d")
    assert got is not None and got.entries == [(1, b"acknowledged"), (2, b"by epoch 2")]


@pytest.mark.parametrize("ttl", [TTL, pytest.param(3.0, marks=pytest.mark.slow)])
async def test_a_sigkilled_leader_is_replaced_within_its_ttl(stores, pg_url: str, spawn: Spawn, ttl: float) -> None:  # type: ignore[no-untyped-def]
    child = spawn("lead", pg_url, "child", ttl)
    assert await next_line(child) == "leader 1"
    assert await next_line(child) == "open"
    tell(child, "write 0")
    assert await next_line(child) == "committed 0"
    standby = stores()
    campaign = asyncio.create_task(standby.campaign("standby", "", ttl))
    done, _ = await asyncio.wait([campaign], timeout=2 * ttl)
    assert not done, "took a live leader's lease"
    killed = time.monotonic()
    child.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(campaign, ttl + 1) == 2
    assert time.monotonic() - killed <= ttl + 1
    recovered = await standby.open()
    assert recovered.epoch == 2
    assert recovered.streams[0].entries == [(1, b"child 0")]


async def test_a_sigstopped_leader_wakes_up_fenced(stores, pg_url: str, spawn: Spawn) -> None:  # type: ignore[no-untyped-def]
    child = spawn("lead", pg_url, "child", TTL)
    assert await next_line(child) == "leader 1"
    assert await next_line(child) == "open"
    tell(child, "write 0")
    assert await next_line(child) == "committed 0"
    child.send_signal(signal.SIGSTOP)
    try:
        standby = stores()
        assert await asyncio.wait_for(standby.campaign("standby", "", TTL), TTL + 2) == 2
        await standby.open()
        tell(child, "write 1")  # waits in the pipe: the child reads it when it wakes
    finally:
        child.send_signal(signal.SIGCONT)
    lines = sorted([await next_line(child), await next_line(child)])
    # the child learns from its renewal (the lease lapsed while it was
    # stopped) or from the write the database refused, whichever runs first
    why = (rf"journal {pg_url}: (epoch 2 holds the leader lease now; this orchestrator's "
           r"epoch 1 is fenced|the leader lease of epoch 1 lapsed)")
    assert re.fullmatch(rf"StoreFenced 1: {why}.*", lines[0]), lines
    assert re.fullmatch(rf"lost: {why}.*", lines[1]), lines
    got = await standby.read("c")
    assert got is not None and got.entries == [(1, b"child 0")]


async def test_campaign_and_leader_misuse(stores) -> None:  # type: ignore[no-untyped-def]
    a = stores()
    with pytest.raises(ValueError, match="a lease TTL must be positive, not 0"):
        await a.campaign("a", "", 0)
    assert await a.campaign("a", "", TTL) == 1
    assert await a.campaign("a", "", TTL) == 1  # already leading: the same term
    await a.resign()
    with pytest.raises(StoreError, match="this store's lease ended; a new term needs a new store"):
        await a.campaign("a", "", TTL)
    with pytest.raises(StoreFenced, match="resigned the leader lease of epoch 1"):
        await a.open()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_one_process_store_always_leads_with_its_epoch(kind: str, tmp_path: Path) -> None:
    url = "memory:" if kind == "memory" else str(tmp_path / "journal.db")
    for expected in (1, 2) if kind == "sqlite" else (1, 1):
        store = open_store(url)
        assert await store.leader() is None
        assert await store.campaign("me", "h:1") == expected
        assert await store.leader() == Leader("me", "h:1", expected)
        recovered = await store.open()  # hands over what campaign() opened
        assert recovered.epoch == expected
        await store.resign()
        assert store.lost.is_set() and await store.leader() is None
        await store.close()
    store = open_store(url)
    recovered = await store.open()
    assert (await store.leader()).epoch == recovered.epoch  # type: ignore[union-attr]
    assert not store.lost.is_set()
    await store.close()


async def test_a_renewal_that_cannot_reach_postgres_lapses_the_lease(stores, postgres) -> None:  # type: ignore[no-untyped-def]
    a = stores()
    await a.campaign("a", "", TTL)
    await a.open()
    await asyncio.to_thread(postgres.stop, "immediate")
    try:
        stopped = time.monotonic()
        await asyncio.wait_for(a.lost.wait(), TTL + 1)
        assert time.monotonic() - stopped <= TTL + 0.5
        pending = a.write([opened("x")])
        assert pending is not None
        with pytest.raises(StoreFenced, match=r"the leader lease of epoch 1 lapsed: not renewed "
                           r"for 1.5 s \(journal .*: cannot reach Postgres: .*\)"):
            await asyncio.wait_for(pending, 5)
    finally:
        await asyncio.to_thread(postgres.start)
    b = stores()
    assert (await b.open()).epoch == 2


async def test_a_takeover_waits_for_the_old_epochs_transaction_in_flight(stores, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """The fence's FOR SHARE: a write of the old epoch that passed the fence
    before the takeover commits first, and the new leader loads it."""
    old, new = stores(), stores()
    await old.campaign("old", "", TTL)
    await old.open()
    await settled(old.write([opened("a")]))
    admin = await asyncpg.connect(pg_url, password=PASSWORD)
    try:
        blocker = admin.transaction()
        await blocker.start()
        await admin.execute("LOCK TABLE squire.streams IN SHARE ROW EXCLUSIVE MODE")
        in_flight = old.write([opened("b")])  # passes the fence, then waits on the lock
        assert in_flight is not None
        waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name ="
                   " 'squire-journal-writer' AND datname = current_database()"
                   " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%streams%'")
        # (asked on a connection outside the blocking transaction, which
        # would see pg_stat_activity as it was when it began)
        seen = await pg_fetch(pg_url, waiting)
        for _ in range(200):
            if seen[0][0]:
                break
            seen = await pg_fetch(pg_url, waiting)
        else:
            raise AssertionError("the write never waited on the lock")
        await old._lease.stop()  # and the old leader renews no more
        takeover = asyncio.create_task(new.campaign("new", "", TTL))
        done, _ = await asyncio.wait([takeover], timeout=3 * TTL)
        assert not done, "took the lease under a write of the old epoch"
        assert not in_flight.done()
        await blocker.rollback()
    finally:
        await admin.close()
    await asyncio.wait_for(in_flight, 5)  # acknowledged: committed before the takeover ...
    assert await asyncio.wait_for(takeover, 5) == 2
    recovered = await new.open()
    assert [s.stream_id for s in recovered.streams] == ["a", "b"]  # ... and seen after it
