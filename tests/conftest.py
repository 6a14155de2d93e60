"""Guards for the whole suite: a leak fails the run instead of hanging it.
And the suite's one Postgres server (tests/pg.py), started by the first test
that asks for ``postgres`` or ``pg_url`` and stopped at the end."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator

import pytest
from pg import Postgres

_GRACE = 10.0  # seconds for children and threads that are stopping to end
_hung = False


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A Postgres server for the session; the store finds its password the
    way it finds any (SQUIRE_STORE_PASSWORD_FILE), children inherit it."""
    try:
        server = Postgres.create()
    except RuntimeError as exc:
        pytest.fail(f"cannot start Postgres for the tests: {exc}")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.destroy()


_databases = itertools.count()


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """A fresh, empty database on the session's server."""
    if not postgres.running():  # a fault test that failed with the server down
        postgres.start()
    return postgres.create_database(f"t{os.getpid()}_{next(_databases)}")


def _lingering_threads() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Interpreter exit joins every process pool's children and every
    non-daemon thread, so one that never ends (a process-pool child ignores
    SIGTERM; a thread cannot be stopped) would hold the run until CI's
    deadline. Report it as a failure instead."""
    global _hung
    deadline = time.monotonic() + _GRACE
    while (children := multiprocessing.active_children()) and time.monotonic() < deadline:
        children[0].join(0.1)
    for child in children:
        child.kill()
    while (threads := _lingering_threads()) and time.monotonic() < deadline:
        threads[0].join(0.1)
    leaks = [f"child process {c.name} (pid {c.pid}), killed" for c in children]
    leaks += [f"thread {t.name}" for t in threads]
    if not leaks:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        for leak in leaks:
            reporter.write_line(f"ERROR: outlived the tests: {leak}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _hung = bool(threads)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _hung:  # exit would wait for those threads forever
        os._exit(pytest.ExitCode.TESTS_FAILED)
