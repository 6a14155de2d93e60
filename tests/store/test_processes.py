"""Real processes around one journal: the flock that keeps a second
orchestrator out (and lets the next one in once the holder is SIGKILLed),
and recovery to exactly the last committed transaction after a SIGKILL in
the middle of writes."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from orchestrator_service._journal import StoreInUse

from .child import entries_of
from .conftest import OpenStore, first_line


def message(pid: int, path: Path) -> str:
    return (f"journal {path} is in use by another orchestrator (pid {pid}); "
            "two orchestrators must not share one SQLite journal")


async def test_a_second_open_in_the_same_process_is_refused(make_store: OpenStore, tmp_path: Path) -> None:
    await make_store()
    with pytest.raises(StoreInUse) as caught:
        await make_store()
    assert caught.value.message == message(os.getpid(), tmp_path / "journal.db")
    assert caught.value.code == "FAILED_PRECONDITION"


async def test_another_process_cannot_open_a_held_journal(make_store: OpenStore, tmp_path: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    store, _ = await make_store()
    child = spawn("try", tmp_path / "journal.db")
    assert first_line(child) == f"StoreInUse FAILED_PRECONDITION: {message(os.getpid(), tmp_path / 'journal.db')}"
    await store.close()
    assert first_line(spawn("try", tmp_path / "journal.db")) == "opened"


async def test_a_sigkilled_holders_lock_does_not_block(make_store: OpenStore, tmp_path: Path, spawn) -> None:  # type: ignore[no-untyped-def]
    holder = spawn("hold", tmp_path / "journal.db")
    assert first_line(holder) == "open"
    with pytest.raises(StoreInUse, match=rf"\(pid {holder.pid}\)"):
        await make_store()
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    assert (tmp_path / "journal.db.lock").read_text().strip() == str(holder.pid)  # stale pid, no lock
    _, recovered = await make_store()
    assert recovered.epoch == 2
    assert (tmp_path / "journal.db.lock").read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("round_", range(3))
async def test_sigkill_mid_write_recovers_the_last_committed_transaction(
    make_store: OpenStore, tmp_path: Path, spawn, round_: int  # type: ignore[no-untyped-def]
) -> None:
    writer = spawn("write", tmp_path / "journal.db")
    assert first_line(writer) == "open"
    kill_after = random.Random(round_).randrange(100, 2000)
    seen = -1
    while seen < kill_after:
        line = first_line(writer)
        assert line == f"committed {seen + 1}", line  # futures resolve in order
        seen += 1
    writer.send_signal(signal.SIGKILL)  # the writer has up to 8 transactions in flight
    assert writer.stdout is not None
    for line in writer.stdout:  # what it printed before it died
        assert line.strip() == f"committed {seen + 1}"
        seen += 1
    assert writer.wait(10) == -signal.SIGKILL

    _, recovered = await make_store()
    (stream,) = recovered.streams
    got = [(kind, payload.split(b":")[:2]) for kind, payload in stream.entries]
    # the log is whole transactions 0..last, in order, nothing torn ...
    expected: list[tuple[int, list[bytes]]] = []
    n = 0
    while len(expected) < len(got):
        expected += [(e.kind, e.payload.split(b":")[:2]) for e in entries_of(n)]
        n += 1
    assert got == expected
    # ... and holds every transaction the child saw committed
    assert n - 1 >= seen, f"child saw {seen} committed; the journal ends at {n - 1}"
    assert n - 1 <= seen + 8  # and at most the writes in flight besides
