"""Guards for the whole suite."""

from __future__ import annotations

import multiprocessing
import time

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run, rather than hang it, when tests leave child processes.

    Interpreter exit joins every process pool's children, so one that never
    ends (a process-pool child ignores SIGTERM) would hold the run until CI's
    deadline. Children a pool is still stopping get a few seconds to exit.
    """
    deadline = time.monotonic() + 10
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        left[0].join(0.1)
    if not left:
        return
    for child in left:
        child.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        names = ", ".join(f"{child.name} (pid {child.pid})" for child in left)
        reporter.write_line(f"ERROR: child processes outlived the tests, killed: {names}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
