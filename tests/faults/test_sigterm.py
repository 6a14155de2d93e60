"""Scenario 6: SIGTERM a worker during a map (what Kubernetes does on scale-down).

The worker stops taking tasks, hands back the unstarted ones at once,
finishes the running ones within its drain grace and exits 0. Tasks still
running at the end of the grace are handed back too and run elsewhere.
No index is lost or delivered twice.
"""

from __future__ import annotations

import signal
import subprocess
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
    scrape,
    square_map,
    start_workers,
)

N = 3_000
GRACE = 5.0


def _sigterm(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = proc.wait(timeout=timeout)
    return code, time.monotonic() - sent


def test_sigterm_drains_a_worker_without_losing_tasks(ledger: Ledger, env: dict[str, str],
                                                      logs: Path, figures: Figures) -> None:
    port = free_port()
    with cluster(env=env, log_dir=logs, metrics_port=port) as c:
        extra = ("--drain-grace", str(GRACE))
        start_workers(c, ["w0", "w1", "w2"], concurrency=2, extra=extra)
        exits: list[tuple[int, float]] = []

        def terminate(delivered: int) -> None:
            if not exits and delivered >= N // 3:
                exits.append(_sigterm(c.workers["w0"], GRACE + 5))

        with squire.Client(c.target) as client:
            run = consume(square_map(N, "term", sleep=0.005).events(client), ledger, "term",
                          terminate)
        ledger.tally("term", N).assert_exactly_once()
        assert_squares(run.values, N)
        [(code, seconds)] = exits
        assert code == 0, c.log("worker-w0")
        assert seconds < GRACE
        returned = outcome(scrape(port), "returned")
    figures.add("6. SIGTERM a worker", "tasks", f"{N:,}")
    figures.add("6. SIGTERM a worker", "exit code", code)
    figures.add("6. SIGTERM a worker", "exit after SIGTERM, s (drain grace 5 s)",
                round(seconds, 2))
    figures.add("6. SIGTERM a worker", "unstarted tasks handed back", returned)
    figures.add("6. SIGTERM a worker", "lost / duplicated deliveries", "0 / 0")


def test_sigterm_hands_back_tasks_running_past_the_grace(ledger: Ledger, env: dict[str, str],
                                                         logs: Path, figures: Figures) -> None:
    grace = 0.5
    n = 6
    with cluster(env=env, log_dir=logs) as c:
        no_prefetch = ("--prefetch", "0")
        start_workers(c, ["w0"], concurrency=2, extra=(*no_prefetch, "--drain-grace", str(grace)))
        # w1 takes all but two tasks, so w0 runs exactly two
        start_workers(c, ["w1"], concurrency=n - 2, executor="thread", extra=no_prefetch)
        stream = squire.IndexedStream.from_iterable(range(n)).map(
            "fault_cancellable", tag="long", slow_from=0, hold=1.5)
        with squire.Client(c.target) as client:
            run = stream.events(client)
            assert isinstance(next(run), squire.DirectiveStarted)

            def w0_busy() -> bool:
                in_flight = {w.worker_id: w.in_flight for w in c.status().workers}
                return in_flight.get("w0") == 2 and len(ledger.markers("started-long-")) == n

            wait_until(w0_busy, 20, message="every task running, two of them at w0")
            [(code, seconds)] = [_sigterm(c.workers["w0"], grace + 5)]
            out = consume(run, ledger, "long")
        tally = ledger.tally("long", n)
        tally.assert_exactly_once()
        assert all(out.values[i] == i * i for i in range(n)), out.values
        assert code == 0, c.log("worker-w0")
        assert seconds < grace + 2.0
        assert tally.re_executions == 2  # the two handed back at the deadline ran again
    figures.add("6. SIGTERM a worker", "tasks running past a 0.5 s grace: exit after, s",
                round(seconds, 2))
    figures.add("6. SIGTERM a worker", "tasks handed back at the deadline and re-run",
                tally.re_executions)
