"""Postgres itself going away under a writing store, for real (pg_ctl stop
and start, fast or as a crash): commits fail and ``failure`` says why
(UNAVAILABLE) while the futures stay pending; once Postgres is back the same
writes commit on a new connection, the lease is kept, and every write that
was acknowledged is in the journal; a write acknowledged once is there once.
And a writer SIGKILLed mid-stream leaves whole transactions."""

from __future__ import annotations

import asyncio
import random
import signal

import asyncpg
import pytest
from pg import PASSWORD, Postgres

from orchestrator_service._journal import Append, Entry, OpenStream, PostgresStore, StreamKind

from .child import entries_of
from .conftest import OpenPg, Spawn, first_line, settled, wait_for


def opened(sid: str) -> OpenStream:
    return OpenStream(sid, StreamKind.DIRECTIVE, b"plan", 1.0)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_postgres_restart_during_writes_loses_nothing_acknowledged(
        make_pg: OpenPg, postgres: Postgres, pg_url: str, mode: str) -> None:
    # a TTL longer than any restart here, loaded or not: the lease is kept
    # (test_lease shows what happens when Postgres stays away past the TTL)
    store = PostgresStore(pg_url)
    await store.campaign("writer", "", ttl=30.0)
    recovered = await store.open()
    await settled(store.write([opened("s")]))
    acknowledged: list[int] = []
    futures: list[asyncio.Future[None]] = []
    window = asyncio.Semaphore(16)
    stop = asyncio.Event()

    async def produce() -> None:
        n = 0
        while not stop.is_set() and store.state.value == "open":
            await window.acquire()
            future = store.write([Append([Entry("s", 1, f"{n}".encode())])])
            assert future is not None
            future.add_done_callback(lambda f, n=n: (window.release(),
                                                     f.exception() or acknowledged.append(n)))
            futures.append(future)
            n += 1

    producer = asyncio.create_task(produce())
    await wait_for(lambda: len(acknowledged) > 200, what="commits before the fault")
    await asyncio.to_thread(postgres.stop, mode)
    try:
        failure = await wait_for(lambda: store.failure, what="the commit to fail")
        assert failure.code == "UNAVAILABLE"
        assert failure.message.startswith(f"journal {store.url}: cannot reach Postgres")
        await wait_for(lambda: store.stats.failed_commits >= 3, what="retries")
        assert any(not f.done() for f in futures)  # held, not failed
        assert all(f.exception() is None for f in futures if f.done())
    finally:
        await asyncio.to_thread(postgres.start)
    before = len(acknowledged)
    await wait_for(lambda: len(acknowledged) > before + 200, what="commits after the restart")
    stop.set()
    await producer
    await asyncio.wait_for(asyncio.gather(*futures), 10)
    assert store.failure is None and not store.lost.is_set()
    assert store.stats.failed_commits >= 3
    written = len(futures)
    await store.close()  # resigns: the next store need not wait out the TTL

    _, again = await make_pg()
    assert again.epoch == recovered.epoch + 1  # the first store kept its lease through it
    (stream,) = again.streams
    got = [int(p) for _, p in stream.entries]
    assert got == list(range(written))  # every write once, in order: none lost, none twice
    assert sorted(acknowledged) == got


@pytest.mark.parametrize("round_", [0, *(pytest.param(r, marks=pytest.mark.slow) for r in (1, 2))])
async def test_sigkill_mid_write_recovers_whole_transactions(
        make_pg: OpenPg, pg_url: str, spawn: Spawn, round_: int) -> None:
    writer = spawn("write", pg_url)
    assert first_line(writer) == "open"
    kill_after = random.Random(round_).randrange(100, 1000)
    seen = -1
    while seen < kill_after:
        line = first_line(writer)
        assert line == f"committed {seen + 1}", line
        seen += 1
    writer.send_signal(signal.SIGKILL)
    assert writer.stdout is not None
    for line in writer.stdout:
        assert line.strip() == f"committed {seen + 1}"
        seen += 1
    assert writer.wait(10) == -signal.SIGKILL

    _, recovered = await make_pg()  # waits out the dead writer's lease (3 s)
    assert recovered.epoch == 2
    (stream,) = recovered.streams
    got = [(kind, payload.split(b":")[:2]) for kind, payload in stream.entries]
    expected: list[tuple[int, list[bytes]]] = []
    n = 0
    while len(expected) < len(got):
        expected += [(e.kind, e.payload.split(b":")[:2]) for e in entries_of(n)]
        n += 1
    assert got == expected
    assert n - 1 >= seen, f"child saw {seen} committed; the journal ends at {n - 1}"
    assert n - 1 <= seen + 8


async def test_writer_connections_killed_mid_stream_commit_every_write_once(
        make_pg: OpenPg, pg_url: str) -> None:
    """pg_terminate_backend on the writer's connection, again and again, at
    whatever point it is (a statement, COMMIT, idle): each kill is a retry
    on a new connection, and a commit whose answer was lost is recognised by
    its marker instead of being applied again."""
    store, _ = await make_pg()
    await settled(store.write([opened("s")]))
    admin = await asyncpg.connect(pg_url, password=PASSWORD)
    kills = 0
    done = asyncio.Event()

    async def kill() -> None:
        """Kill the writer's connection, wait for commits on its next one, again."""
        nonlocal kills
        while not done.is_set():
            kills += await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE"
                " application_name = 'squire-journal-writer' AND datname = current_database()")
            commits = store.stats.commits
            await wait_for(lambda c=commits: store.stats.commits > c + 4 or done.is_set(),  # type: ignore[misc]
                           what="commits after the kill")

    killer = asyncio.create_task(kill())
    window = asyncio.Semaphore(16)
    futures = []
    try:
        for n in range(3000):
            await window.acquire()
            future = store.write([Append([Entry("s", 1, f"{n}".encode())])])
            assert future is not None
            future.add_done_callback(lambda _: window.release())
            futures.append(future)
        await asyncio.wait_for(asyncio.gather(*futures), 30)
    finally:
        done.set()
        await killer
        await admin.close()
    assert kills >= 10 and store.stats.failed_commits >= 5, (kills, store.stats.failed_commits)
    assert store.stats.commits < 3000 / 4  # batches still
    assert store.failure is None and not store.lost.is_set()
    got = await store.read("s")
    assert got is not None
    assert [int(p) for _, p in got.entries] == list(range(3000))
