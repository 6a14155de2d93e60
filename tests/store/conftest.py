"""Fixtures for the journal store's tests: real SQLite files in tmp_path, a
real Postgres server (one per session, a fresh database per test; see
tests/pg.py), and real filesystems that fail writes (a 1 MiB tmpfs that
fills up, a file made immutable with chattr, which stops even root's writes
through open files).

``journal`` is either backend behind one face, for the tests of semantics
both must share: ``await journal.open()`` opens a store on the test's
journal (the same one each time), ``await journal.count_entries()`` counts
its rows through a connection of its own, as another process would."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from pg import PASSWORD

from orchestrator_service._journal import (
    PostgresStore,
    Recovered,
    SqliteStore,
    Store,
    open_store,
)

T = TypeVar("T")
ROOT_ONLY = ("as root (CI runs as root); mounting a filesystem or setting the immutable "
             "attribute needs CAP_SYS_ADMIN / CAP_LINUX_IMMUTABLE, and a user's chmod "
             "cannot make a file unwritable to a process that has it open")


async def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` on the loop until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)
    return value


async def settled(future: Awaitable[None] | None, timeout: float = 10.0) -> None:
    if future is not None:
        await asyncio.wait_for(future, timeout)


OpenStore = Callable[..., Awaitable[tuple[SqliteStore, Recovered]]]


@pytest.fixture
async def make_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens SQLite stores (default file: tmp_path/journal.db) and closes
    whichever are still open at the end of the test."""
    opened: list[Store] = []

    async def make(path: Path | str | None = None, **kwargs: object
                   ) -> tuple[SqliteStore, Recovered]:
        store = open_store(str(path or tmp_path / "journal.db"), **kwargs)  # type: ignore[arg-type]
        assert isinstance(store, SqliteStore)
        opened.append(store)
        return store, await store.open()

    yield make
    for store in opened:
        await store.close()


OpenPg = Callable[..., Awaitable[tuple[PostgresStore, Recovered]]]


@pytest.fixture
async def make_pg(pg_url: str) -> AsyncIterator[OpenPg]:
    """Opens Postgres stores (default: the test's database) and closes
    whichever are still open at the end of the test."""
    opened: list[PostgresStore] = []

    async def make(url: str | None = None, **kwargs: Any) -> tuple[PostgresStore, Recovered]:
        store = PostgresStore(url or pg_url, **kwargs)
        opened.append(store)
        return store, await store.open()

    yield make
    for store in opened:
        await store.close()


async def pg_fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    """``query`` on a connection of its own (the password as the store finds it)."""
    conn = await asyncpg.connect(url, password=PASSWORD)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


class Journal:
    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.opened: list[Store] = []

    async def open(self, **kwargs: Any) -> tuple[Any, Recovered]:
        store = open_store(self.url, **kwargs)
        self.opened.append(store)
        return store, await store.open()

    async def count_entries(self) -> int:
        if self.kind == "sqlite":
            with sqlite3.connect(self.url) as conn:
                return int(conn.execute("SELECT count(*) FROM entries").fetchone()[0])
        rows = await pg_fetch(self.url, "SELECT count(*) FROM squire.entries")
        return int(rows[0][0])


@pytest.fixture(params=["sqlite", "postgres"])
async def journal(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Journal]:
    if request.param == "sqlite":
        j = Journal("sqlite", str(tmp_path / "journal.db"))
    else:
        j = Journal("postgres", request.getfixturevalue("pg_url"))
    yield j
    for store in j.opened:
        await store.close()


CHILD = Path(__file__).with_name("child.py")
REPO = Path(__file__).resolve().parents[2]
Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts tests/store/child.py with ``mode`` and its arguments (stdin and
    stdout piped); kills whichever are still alive at the end."""
    children: list[subprocess.Popen[str]] = []

    def start(mode: str, *args: object) -> subprocess.Popen[str]:
        child = subprocess.Popen([sys.executable, str(CHILD), mode, *map(str, args)], cwd=REPO,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 bufsize=1)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(10)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def first_line(child: subprocess.Popen[str]) -> str:
    assert child.stdout is not None
    line = child.stdout.readline().strip()
    assert line, f"child exited ({child.wait(10)}) without a word"
    return line


async def next_line(child: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The child's next line, read off the loop (which goes on meanwhile)."""
    return await asyncio.wait_for(asyncio.to_thread(first_line, child), timeout)


def tell(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a real filesystem that runs out of space."""
    if os.geteuid() != 0:
        pytest.fail(f"the disk-full test mounts a 1 MiB tmpfs: run it {ROOT_ONLY}")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    if done.returncode:
        pytest.fail(f"cannot mount a 1 MiB tmpfs on {mnt} (is CAP_SYS_ADMIN dropped?): "
                    f"{done.stderr.strip()}")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


def fill(directory: Path) -> Path:
    """Fill the filesystem holding ``directory`` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _immutable_enforced(directory: Path) -> bool:
    """Does this filesystem stop writes through a descriptor opened before
    the file became immutable? ext4 does; tmpfs and overlayfs may not."""
    probe = directory / "probe"
    with open(probe, "wb", buffering=0) as f:
        if _run("chattr", "+i", str(probe)).returncode:
            return False
        try:
            f.write(b"x")
            enforced = False
        except PermissionError:
            enforced = True
        finally:
            _run("chattr", "-i", str(probe))
    probe.unlink()
    return enforced


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory where ``chattr +i`` makes an open file unwritable: tmp_path
    itself if its filesystem enforces that, else a loop-mounted 8 MiB ext4."""
    if os.geteuid() != 0:
        pytest.fail(f"the read-only journal test sets the immutable attribute: run it {ROOT_ONLY}")
    here = tmp_path / "ro"
    here.mkdir()
    if _immutable_enforced(here):
        yield here
        return
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    steps = [("mkfs.ext4", "-q", "-F", str(image)), ("mount", "-o", "loop", str(image), str(here))]
    for step in steps:
        done = _run(*step)
        if done.returncode:
            pytest.fail(f"{tmp_path} does not enforce chattr +i on open files, and "
                        f"{' '.join(step)} failed: {done.stderr.strip()}")
    try:
        yield here
    finally:
        _run("umount", "-l", str(here))


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[Callable[[], None]]:
    """Make ``paths`` immutable; the yielded function (and the exit) lifts it."""
    for path in paths:
        done = _run("chattr", "+i", str(path))
        assert done.returncode == 0, done.stderr

    def lift() -> None:
        for path in paths:
            _run("chattr", "-i", str(path))

    try:
        yield lift
    finally:
        lift()
