"""Scenario 1b: SIGKILL one process-executor child in the middle of its batch.

A child holds a short queue of tasks behind the one it runs (about 10 ms of
work). Killing it takes only its own tasks: the one it was running is
reported crashed and re-queued by the orchestrator (below the poison
threshold), the rest of its queue goes back to its worker's FIFO unblamed,
and the worker's other child and the other worker never notice. The worker
spawns a replacement child and the map completes: every value delivered
exactly once, and every index run twice was in the killed child first.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import squire
from procs import cluster, wait_until

from worker_service._child import FLUSH_SECONDS

from .support import (
    Figures,
    Ledger,
    assert_squares,
    consume,
    process_tree,
    square_map,
    start_workers,
)

N = 3_000
TAG = "childkill"
SLEEP = 0.002  # each task's run


def _ledger_pids(ledger: Ledger) -> dict[int, list[int]]:
    """pid -> the indices of TAG that process started, from its own ledger file."""
    out: dict[int, list[int]] = {}
    for path in ledger.dir.glob("exec-*.log"):
        pid = int(path.stem.removeprefix("exec-"))
        out[pid] = [int(x) for t, _, x in (line.partition(" ") for line in
                                            path.read_text().splitlines())
                    if t == TAG and x.isdigit()]
    return out


def test_sigkill_a_child_mid_batch(ledger: Ledger, env: dict[str, str], logs: Path,
                                   figures: Figures) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1"], concurrency=2, extra=("--prefetch", "64"))
        worker = c.workers["w0"]
        victim: list[int] = []

        def kill_once(delivered: int) -> None:
            if victim or delivered < N // 4:
                return
            children = set(process_tree(worker.pid)[1:])
            ran = {pid: len(xs) for pid, xs in _ledger_pids(ledger).items() if pid in children}
            pid = max(ran, key=ran.__getitem__)
            os.kill(pid, signal.SIGKILL)
            victim.append(pid)

        with squire.Client(c.target) as client:
            run = consume(square_map(N, TAG, sleep=SLEEP).events(client), ledger, TAG, kill_once)
        assert victim, "the map ended before the kill"
        [killed] = victim
        tally = ledger.tally(TAG, N)
        tally.assert_exactly_once()
        assert_squares(run.values, N)

        # It died mid-batch: tasks queued behind the one it ran went back unrun.
        log = (logs / "worker-w0.log").read_text()
        [(running, held)] = re.findall(
            rf"child \d \(pid {killed}\) died, exit code -9(, running task \S+)?; "
            r"(\d+) task\(s\) it held go back", log)
        assert int(held) >= 1, log[-2000:]
        # Only the killed child's tasks ran again, and few of them: the one it
        # was running (if it was not between tasks), and those whose results
        # it had not sent yet (a child sends every 20 ms: ten of these).
        started = _ledger_pids(ledger)
        again = {i for i, n in tally.executions.items() if n > 1}
        assert again <= set(started[killed]), "a task of another child ran twice"
        assert len(again) <= 1 + FLUSH_SECONDS / SLEEP + 1, again
        assert again or not running, "the task it was running did not run again"
        # The worker lives on with a replacement child; nothing else crashed.
        assert worker.poll() is None
        wait_until(lambda: len(set(process_tree(worker.pid)[1:]) - {killed}) >= 2, 30,
                   message="a replacement child")
        assert log.count("died, exit code") == 1
        assert "died, exit code" not in (logs / "worker-w1.log").read_text()
    figures.add("1b. SIGKILL of one child mid-batch", "tasks", f"{N:,} (2 workers x 2 children)")
    figures.add("1b. SIGKILL of one child mid-batch", "queued tasks handed back unrun", int(held))
    figures.add("1b. SIGKILL of one child mid-batch", "tasks executed twice", len(again))
    figures.add("1b. SIGKILL of one child mid-batch", "lost / duplicated deliveries", "0 / 0")
