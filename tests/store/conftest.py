"""Fixtures for the journal store's tests: real SQLite files in tmp_path, and
real filesystems that fail writes (a 1 MiB tmpfs that fills up, a file made
immutable with chattr, which stops even root's writes through open files)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator_service._journal import Recovered, SqliteStore, Store, open_store

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
