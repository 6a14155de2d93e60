"""A process using a journal, for the tests that need a second process or a
SIGKILL: ``hold PATH`` opens it and waits to be killed; ``try PATH`` tries to
open it and prints what happened; ``write PATH`` writes transactions in a
loop, printing ``committed N`` as each one's future resolves (PATH may be a
store URL). ``lead URL HOLDER TTL`` campaigns for the leader lease, prints
``leader EPOCH``, opens and prints ``open``, then for each ``write N`` on
stdin writes one entry to stream ``c`` and prints ``committed N`` or
``StoreFenced N: message``, and prints ``lost: message`` once the lease ends."""

from __future__ import annotations

import asyncio
import sys

from orchestrator_service._journal import (
    Append,
    Entry,
    OpenStream,
    StoreError,
    StreamKind,
    open_store,
)

IN_FLIGHT = 8


def entries_of(n: int) -> list[Entry]:
    """Transaction n: 1-4 entries that say which transaction they belong to."""
    return [Entry("s", n % 7, f"{n}:{i}:".encode() + b"." * 200) for i in range(1 + n % 4)]


async def lead(url: str, holder: str, ttl: float) -> None:
    store = open_store(url)
    print(f"leader {await store.campaign(holder, f'{holder}:1', ttl)}", flush=True)
    await store.open()
    await store.write([OpenStream("c", StreamKind.DIRECTIVE, b"", 0.0)])  # type: ignore[misc]
    print("open", flush=True)

    async def watch() -> None:
        await store.lost.wait()
        print(f"lost: {store.failure.message if store.failure else ''}", flush=True)

    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(watch())
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            n = int(line.split()[1])
            try:
                await store.write([Append([Entry("c", 1, f"child {n}".encode())])])  # type: ignore[misc]
            except StoreError as exc:
                print(f"{type(exc).__name__} {n}: {exc.message}", flush=True)
            else:
                print(f"committed {n}", flush=True)
        watcher.cancel()
    await store.close()


async def main(mode: str, path: str, *args: str) -> None:
    if mode == "lead":
        await lead(path, args[0], float(args[1]))
        return
    store = open_store(path)
    if mode == "try":
        try:
            await store.open()
        except StoreError as exc:
            print(f"{type(exc).__name__} {exc.code}: {exc.message}", flush=True)
        else:
            print("opened", flush=True)
            await store.close()
        return
    await store.open()
    print("open", flush=True)
    if mode == "hold":
        await asyncio.Event().wait()
    opened = store.write([OpenStream("s", StreamKind.DIRECTIVE, b"", 0.0)])
    assert opened is not None
    await opened
    window: asyncio.Queue[None] = asyncio.Queue(IN_FLIGHT)
    n = 0
    while True:
        await window.put(None)
        future = store.write([Append(entries_of(n))])
        assert future is not None

        def done(_: object, n: int = n) -> None:
            window.get_nowait()
            sys.stdout.write(f"committed {n}\n")
            sys.stdout.flush()

        future.add_done_callback(done)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
