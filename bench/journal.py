"""Micro-benchmark of the journal store: ``python bench/journal.py``.

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
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgpack

from orchestrator_service._journal import (
    Append,
    Entry,
    OpenStream,
    SqliteStore,
    StreamKind,
    open_store,
)
from squire_kernel import loop as _loop

IN_FLIGHT = 64


async def fresh(path: Path, synchronous: str = "normal") -> SqliteStore:
    store = open_store(str(path), synchronous=synchronous)
    assert isinstance(store, SqliteStore)
    await store.open()
    future = store.write([OpenStream("s", StreamKind.DIRECTIVE, b"plan", time.time())])
    assert future is not None
    await future
    return store


async def throughput(path: Path, batch: int, size: int, total_bytes: int) -> dict[str, float]:
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


async def latency(path: Path, count: int, synchronous: str) -> dict[str, float]:
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


async def load(path: Path, tasks: int, per_entry: int = 512) -> dict[str, float]:
    store = await fresh(path)
    futures = []
    for first in range(0, tasks, per_entry):
        future = store.write([Append([Entry("s", 2, outcome_batch(first, min(per_entry, tasks - first)))])])
        assert future is not None
        futures.append(future)
    await asyncio.gather(*futures)
    await store.close()
    size = store.stats.journal_bytes()
    again = open_store(str(path))
    recovered = await again.open()
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


async def main(quick: bool, directory: Path) -> None:
    total = (4 << 20) if quick else (64 << 20)
    print(f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, "
          f"loop {type(asyncio.get_running_loop()).__module__}")
    for size in (16, 1024):
        for batch in (64, 512, 4096):
            path = directory / f"t-{size}-{batch}.db"
            bytes_ = total // (64 if size == 16 else 1)
            show(f"append {batch} x {size} B", await throughput(path, batch, size, bytes_))
    # the shape the orchestrator writes: one entry per batch, tens of KiB up
    show("append 1 x 1 MiB", await throughput(directory / "t-big.db", 1, 1 << 20, total * 2))
    for synchronous in ("normal", "full"):
        count = 1000 if quick else 10_000
        show(f"1-entry commits, {synchronous}", await latency(directory / f"l-{synchronous}.db",
                                                             count, synchronous))
    tasks = 100_000 if quick else 1_000_000
    show(f"load {tasks:,} outcomes", await load(directory / "load.db", tasks))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--dir", type=Path, help="where the journals go (default: a temp dir)")
    parser.add_argument("--loop", default="auto", choices=_loop.EVENT_LOOPS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        _loop.run(main(args.quick, Path(tmp)), args.loop)
