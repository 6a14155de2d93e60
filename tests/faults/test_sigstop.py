"""Scenario 2: SIGSTOP a worker (and its pool children) during a map.

The frozen worker sends no heartbeat; after the lease timeout (2 s here) the
orchestrator declares it lost and re-queues its tasks to the other workers.
It is resumed with SIGCONT while the map still runs: whatever it finished
while frozen belongs to a stream the orchestrator ended, so it is dropped,
and the worker reconnects and takes new work. Nothing is delivered twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import squire
from procs import cluster, free_port, wait_until

from .support import (
    Figures,
    Ledger,
    assert_squares,
    consume,
    outcome,
    process_tree,
    scrape,
    square_map,
    start_workers,
)

N = 4_000
LEASE_TIMEOUT = 2.0


def test_sigstop_worker_tasks_move_on_and_late_results_are_dropped(
    ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures
) -> None:
    metrics_port = free_port()
    args = ("--lease-timeout", str(LEASE_TIMEOUT), "--heartbeat-interval", "0.5")
    with cluster(orchestrator_args=args, env=env, log_dir=logs, metrics_port=metrics_port) as c:
        start_workers(c, ["w0", "w1", "w2"], concurrency=2)
        victim = c.workers["w0"]
        frozen: list[int] = []
        times: dict[str, float] = {}
        monitor_error: list[BaseException] = []

        def monitor() -> None:
            # Resume the worker as soon as the orchestrator has given up on it.
            try:
                wait_until(lambda: "w0" not in {w.worker_id for w in c.status().workers},
                           timeout=LEASE_TIMEOUT + 10, message="w0 declared lost")
                times["lost"] = time.monotonic()
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
                times["resumed"] = time.monotonic()
            except BaseException as exc:
                monitor_error.append(exc)

        watcher = threading.Thread(target=monitor, daemon=True)

        def freeze(delivered: int) -> None:
            if frozen or delivered < N // 10:
                return
            frozen.extend(process_tree(victim.pid))
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            times["stopped"] = time.monotonic()
            watcher.start()

        with squire.Client(c.target) as client:
            # A small sleep per task keeps the map running past the lease timeout.
            run = consume(square_map(N, "stop", sleep=0.004).events(client), ledger, "stop",
                          freeze)
        done = time.monotonic()
        watcher.join(timeout=LEASE_TIMEOUT + 15)
        assert not monitor_error, monitor_error
        assert frozen and "lost" in times, "the worker was never frozen and declared lost"
        tally = ledger.tally("stop", N)
        tally.assert_exactly_once()
        assert_squares(run.values, N)

        detected = times["lost"] - times["stopped"]
        # the lease timeout plus a tick and a status poll (generous: CI is busy)
        assert LEASE_TIMEOUT - 0.1 <= detected <= LEASE_TIMEOUT + 3.0, detected
        # the resumed worker comes back under its own id and keeps serving
        c.wait_for_workers({"w0"}, timeout=30)
        assert victim.poll() is None
        second = consume(square_map(600, "after").events(client := squire.Client(c.target)),
                         ledger, "after")
        client.close()
        ledger.tally("after", 600).assert_exactly_once()
        assert_squares(second.values, 600)
        metrics = scrape(metrics_port)
        requeued = outcome(metrics, "requeued")
        assert requeued >= 1, "the frozen worker's leases were not re-queued"

    figures.add("2. SIGSTOP a worker", "tasks", f"{N:,}")
    figures.add("2. SIGSTOP a worker", "lease timeout, s", LEASE_TIMEOUT)
    figures.add("2. SIGSTOP a worker", "worker declared lost after, s", round(detected, 2))
    figures.add("2. SIGSTOP a worker", "map done after SIGSTOP, s",
                round(done - times["stopped"], 2))
    figures.add("2. SIGSTOP a worker", "tasks re-queued", requeued)
    figures.add("2. SIGSTOP a worker", "late results dropped (orchestrator)",
                outcome(metrics, "duplicate") + outcome(metrics, "late"))
    figures.add("2. SIGSTOP a worker", "tasks run twice (frozen worker + re-run), delivered once",
                tally.re_executions)
    figures.add("2. SIGSTOP a worker", "lost / duplicated deliveries", "0 / 0")
