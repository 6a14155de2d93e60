"""Micro-benchmark of the journal store: ``python bench/journal.py``.

Both durable backends, SQLite (a file in a temp dir) and Postgres (a real
server started the way the tests start one, tests/pg.py: fsync on, on
127.0.0.1), in alternating rounds (``--rounds``; even rounds SQLite first,
odd rounds Postgres first) so that a neighbour's load hits both alike; each
figure is the median of the rounds with their range. ``--backends`` picks.

- append throughput from one asyncio producer: write()s of N entries each
  (N = 64, 512, 4096) of ~16 B and ~1 KiB payloads, and of one 1 MiB entry,
  at most 64 writes in flight; entries/s and payload MB/s until the last
  future resolves;
- commit latency: one-entry writes, each awaited before the next (p50/p99 of
  write() to resolved, and commits/s), for synchronous=normal and =full;
- load: open() of a journal holding 1,000,000 task outcomes, msgpack'd 512 to
  an entry (1,954 entries), as the orchestrator journals them.

Every figure is printed, none asserted. ``--quick`` shrinks the sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg import Postgres

from orchestrator_service._journal import (
    Append,
    Entry,
    OpenStream,
    Store,
    StreamKind,
    open_store,
)
from squire_kernel import loop as _loop

IN_FLIGHT = 64


async def fresh(path: Path | str, synchronous: str = "normal") -> Store:
    store = open_store(str(path), synchronous=synchronous)
    await store.open()
    future = store.write([OpenStream("s", StreamKind.DIRECTIVE, b"plan", time.time())])
    assert future is not None
    await future
    return store


async def throughput(path: Path | str, batch: int, size: int, total_bytes: int) -> dict[str, float]:
    store = await fresh(path)
    payload = b"p" * size
    entries = [Entry("s", 1, payload) for _ in range(batch)]
    writes = max(8, total_bytes // (batch * size))
    window = asyncio.Semaphore(IN_FLIGHT)
    started = time.perf_counter()
    futures = []
    for _ in range(writes):
        await window.acquire()
        future = store.write([Append(entries)])
        assert future is not None
        future.add_done_callback(lambda _: window.release())
        futures.append(future)
    await asyncio.gather(*futures)
    seconds = time.perf_counter() - started
    commits = store.stats.commits - 1
    await store.close()
    n = writes * batch
    return {"entries/s": n / seconds, "MB/s": n * size / seconds / 1e6,
            "writes/commit": writes / commits}


async def latency(path: Path | str, count: int, synchronous: str) -> dict[str, float]:
    store = await fresh(path, synchronous)
    times = []
    entry = [Append([Entry("s", 1, b"x" * 16)])]
    started = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        future = store.write(entry)
        assert future is not None
        await future
        times.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    await store.close()
    times.sort()
    return {"commits/s": count / seconds, "p50 ms": statistics.median(times) * 1e3,
            "p99 ms": times[int(len(times) * 0.99)] * 1e3}


def outcome_batch(first: int, n: int) -> bytes:
    # the shape of a batch of map outcomes: (index, ok, value) with a small value
    return msgpack.packb([(i, True, msgpack.packb(i * 3)) for i in range(first, first + n)])


async def load(path: Path | str, tasks: int, per_entry: int = 512) -> dict[str, float]:
    store = await fresh(path)
    futures = []
    for first in range(0, tasks, per_entry):
        future = store.write([Append([Entry("s", 2, outcome_batch(first, min(per_entry, tasks - first)))])])
        assert future is not None
        futures.append(future)
    await asyncio.gather(*futures)
    await store.close()
    again = open_store(str(path))
    recovered = await again.open()
    size = again.stats.journal_bytes()
    decoded_at = time.perf_counter()
    count = sum(len(msgpack.unpackb(p)) for _, p in recovered.streams[0].entries)
    decode = time.perf_counter() - decoded_at
    await again.close()
    assert count == tasks
    return {"entries": len(recovered.streams[0].entries), "open() s": recovered.seconds,
            "msgpack decode s": decode, "journal MB": size / 1e6}


def show(title: str, row: dict[str, float]) -> None:
    cells = "  ".join(f"{k} {v:,.3f}" if v < 100 else f"{k} {v:,.0f}" for k, v in row.items())
    print(f"{title:<34} {cells}", flush=True)


def spread(values: list[float]) -> str:
    def f(v: float) -> str:
        return f"{v:,.3f}" if v < 100 else f"{v:,.0f}"
    if len(values) == 1:
        return f(values[0])
    return f"{f(statistics.median(values))} ({f(min(values))}-{f(max(values))})"


async def main(quick: bool, directory: Path, backends: list[str], rounds: int) -> None:
    total = (4 << 20) if quick else (64 << 20)
    server = Postgres.create() if "postgres" in backends else None
    names = itertools.count()
    try:
        if server is not None:
            os.environ.update(server.env())
            print(f"postgres: {server.sql('SHOW server_version')} on 127.0.0.1:{server.port}, "
                  f"fsync {server.sql('SHOW fsync')}, "
                  f"synchronous_commit {server.sql('SHOW synchronous_commit')}")
        print(f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, "
              f"loop {type(asyncio.get_running_loop()).__module__}, {rounds} rounds")

        def target(backend: str) -> Path | str:
            n = next(names)
            if backend == "sqlite":
                return directory / f"j{n}.db"
            assert server is not None
            return server.create_database(f"bench{n}")

        cases: list[tuple[str, Callable[[str], object]]] = []
        for size in (16, 1024):
            for batch in (64, 512, 4096):
                bytes_ = total // (64 if size == 16 else 1)
                cases.append((f"append {batch} x {size} B", lambda b, batch=batch, size=size,
                              bytes_=bytes_: throughput(target(b), batch, size, bytes_)))
        # the shape the orchestrator writes: one entry per batch, tens of KiB up
        cases.append(("append 1 x 1 MiB", lambda b: throughput(target(b), 1, 1 << 20, total * 2)))
        count = 1000 if quick else 10_000
        cases.append(("1-entry commits", lambda b: latency(target(b), count, "normal")))
        cases.append(("1-entry commits, sqlite full", lambda b: latency(target(b), count, "full")))
        results: dict[tuple[str, str], list[dict[str, float]]] = defaultdict(list)
        for r in range(rounds):
            order = backends if r % 2 == 0 else backends[::-1]
            for title, run in cases:
                for backend in order:
                    if "sqlite full" in title and backend != "sqlite":
                        continue
                    row = await run(backend)  # type: ignore[misc]
                    results[(title, backend)].append(row)
                    show(f"[{r}] {backend:<8} {title}", row)
        print("\nmedian (min-max) over the rounds:")
        for (title, backend), rows in results.items():
            cells = "  ".join(f"{k} {spread([row[k] for row in rows])}" for k in rows[0])
            print(f"{backend:<8} {title:<30} {cells}", flush=True)
        tasks = 100_000 if quick else 1_000_000
        for backend in backends:
            show(f"{backend:<8} load {tasks:,} outcomes", await load(target(backend), tasks))
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--dir", type=Path, help="where the journals go (default: a temp dir)")
    parser.add_argument("--loop", default="auto", choices=_loop.EVENT_LOOPS)
    parser.add_argument("--backends", default="sqlite,postgres",
                        help="comma-separated: sqlite, postgres (default both)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        _loop.run(main(args.quick, Path(tmp), args.backends.split(","), args.rounds), args.loop)
