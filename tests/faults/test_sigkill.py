"""Scenario 1: SIGKILL workers at random moments of a 5,000-task map.

Three process-executor workers run the map; at one or two random points of
each round a random worker is killed with SIGKILL and a replacement is
started at once. The orchestrator sees the stream break and re-queues the
dead worker's leases. Every round: result correct, lost 0, duplicates 0.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import squire
from procs import cluster, wait_until

from .support import Figures, Ledger, assert_squares, consume, square_map, start_workers

N = 5_000
WORKERS = 3


def _kill_rounds(rounds: int, ledger: Ledger, env: dict[str, str], logs: Path,
                 figures: Figures, label: str) -> None:
    seed = int(os.environ.get("SQUIRE_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    kills = 0
    re_executions = 0
    seconds: list[float] = []
    with cluster(env=env, log_dir=logs) as c:
        ids = [f"w{i}" for i in range(WORKERS)]
        start_workers(c, ids, concurrency=2)
        serial = WORKERS
        with squire.Client(c.target) as client:
            for round_no in range(rounds):
                tag = f"kill{round_no}"
                # one or two kills per round, at random points of the map
                points = sorted(rng.sample(range(N // 20, N * 9 // 10), rng.choice((1, 2))))

                def maybe_kill(delivered: int, points: list[int] = points) -> None:
                    nonlocal serial, kills
                    while points and delivered >= points[0]:
                        points.pop(0)
                        victim = rng.choice(ids)
                        c.workers[victim].send_signal(signal.SIGKILL)
                        c.workers[victim].wait()
                        kills += 1
                        ids.remove(victim)
                        replacement = f"w{serial}"
                        serial += 1
                        c.start_worker(replacement, ops="faults.fault_ops", concurrency=2,
                                       wait=False)
                        ids.append(replacement)

                run = consume(square_map(N, tag).events(client), ledger, tag, maybe_kill)
                tally = ledger.tally(tag, N)
                tally.assert_exactly_once()
                assert_squares(run.values, N)
                re_executions += tally.re_executions
                seconds.append(run.seconds)
                # the replacements must be in before the next round starts
                c.wait_for_workers(set(ids), timeout=60)
                status = c.status()
                assert not status.directives, "a finished directive is still listed"
        wait_until(lambda: c.status().queue_depth == 0, 5, message="empty queues")
        assert c.orchestrator.poll() is None, "the orchestrator died"
    assert kills >= rounds
    figures.add(label, "rounds x tasks", f"{rounds} x {N:,}")
    figures.add(label, "workers SIGKILLed (each replaced)", kills)
    figures.add(label, "lost / duplicated deliveries", "0 / 0")
    figures.add(label, "tasks re-executed after kills", re_executions)
    figures.add(label, "seed", seed)
    figures.add(label, "map wall time, s (median)", round(sorted(seconds)[len(seconds) // 2], 2))


def test_sigkill_random_workers_during_map(ledger: Ledger, env: dict[str, str], logs: Path,
                                           figures: Figures) -> None:
    _kill_rounds(5, ledger, env, logs, figures, "1. SIGKILL during map")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_random_workers_during_map_long(ledger: Ledger, env: dict[str, str],
                                                logs: Path, figures: Figures) -> None:
    _kill_rounds(40, ledger, env, logs, figures, "1. SIGKILL during map (slow run)")
