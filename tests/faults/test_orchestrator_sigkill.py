"""The orchestrator SIGKILLed at random moments of a directive, restarted on
the same journal (issue 15).

Three workers run the directive; at one or two random points of each round
the orchestrator is killed with SIGKILL and a new one is started on the same
port and state directory. The SDK's call sees the stream break, reattaches by
directive id with what it has, and the new orchestrator goes on from its
journal: only tasks without a journaled outcome run again. Every round: the
values exact, lost 0, duplicated deliveries 0; the tasks executed twice are
counted and stay within what was in flight at the kills.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import squire
from procs import Cluster, cluster, wait_until

from .support import (
    Figures,
    Ledger,
    assert_squares,
    consume,
    square_map,
    start_workers,
    stream_channel,
)

N = 5_000
WORKERS = 3
CONCURRENCY = 2


def _seed() -> int:
    return int(os.environ.get("SQUIRE_FAULT_SEED", time.time_ns() % 1_000_000))


def _killer(c: Cluster, rng: random.Random, n: int, counter: list[int], *,
            twice: bool = False) -> Callable[[int], None]:
    points = sorted(rng.sample(range(n // 20, n * 9 // 10), rng.choice((1, 2))))

    def maybe_kill(delivered: int) -> None:
        while points and delivered >= points[0]:
            points.pop(0)
            c.kill_orchestrator()
            counter[0] += 1
            c.restart_orchestrator()
            if twice:
                # Killed again during its recovery, then once more restarted.
                time.sleep(rng.uniform(0.05, 0.4))
                c.kill_orchestrator()
                counter[0] += 1
                c.restart_orchestrator()

    return maybe_kill


# Results the orchestrator has received but not yet journaled when it dies
# are lost too, and no credit window bounds them: they were reported, so
# their leases were freed. How many depends on throughput and on how long a
# commit takes just then. With the batched process executor (issue 19), which
# completes these 1 ms tasks faster than the pool before it, up to ~260 per
# kill were seen in a few of many kills (the leased share is at most 24); why
# so many at those kills was not pinned down.
UNCOMMITTED = 300


def _in_flight_bound(kills: int) -> int:
    # At a kill, each worker may hold its capacity plus its prefetch window of
    # leased tasks, and results may wait for their commit; those (and no
    # others) may run again.
    return kills * (WORKERS * CONCURRENCY * 4 + UNCOMMITTED)


@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice-in-a-row"])
def test_orchestrator_sigkill_during_map(ledger: Ledger, env: dict[str, str], logs: Path,
                                         figures: Figures, twice: bool) -> None:
    seed = _seed()
    rng = random.Random(seed)
    rounds = int(os.environ.get("SQUIRE_FAULT_ROUNDS", "5")) if not twice else 2
    kills = [0]
    re_executions = 0
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, [f"w{i}" for i in range(WORKERS)], concurrency=CONCURRENCY)
        with squire.Client(c.target) as client:
            for round_no in range(rounds):
                tag = f"okill{int(twice)}{round_no}"
                # A new directive needs the orchestrator up (only running ones reattach).
                wait_until(c.serving, 30, message="the orchestrator serving")
                before = kills[0]
                run = consume(square_map(N, tag, sleep=0.001).events(client), ledger, tag,
                              _killer(c, rng, N, kills, twice=twice))
                tally = ledger.tally(tag, N)
                tally.assert_exactly_once()
                assert_squares(run.values, N)
                assert tally.re_executions <= _in_flight_bound(kills[0] - before), (
                    f"{tally.re_executions} tasks ran twice after {kills[0] - before} kills"
                )
                re_executions += tally.re_executions
        # The last kill may land at the very end: the restart must be serving first.
        wait_until(lambda: c.serving() and not c.status().directives, 30,
                   message="no directive left")
    label = "orchestrator SIGKILL x2 in a row" if twice else "orchestrator SIGKILL"
    figures.add(label, "rounds x tasks", f"{rounds} x {N:,}")
    figures.add(label, "orchestrator SIGKILLs (each restarted on its journal)", kills[0])
    figures.add(label, "lost / duplicated deliveries", "0 / 0")
    figures.add(label, "tasks executed again after the kills", re_executions)
    figures.add(label, "seed", seed)


def test_orchestrator_sigkill_during_map_then_fold(ledger: Ledger, env: dict[str, str],
                                                   logs: Path, figures: Figures) -> None:
    rng = random.Random(_seed())
    n = 3_000
    kills = [0]
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, [f"w{i}" for i in range(WORKERS)], concurrency=CONCURRENCY)
        with squire.Client(c.target) as client:
            for round_no in range(2):
                tag = f"ofold{round_no}"
                wait_until(c.serving, 30, message="the orchestrator serving")
                stream = (squire.IndexedStream.from_iterable(range(n))
                          .map("fault_square", tag=tag, sleep=0.001).fold("fault_sum"))
                maybe_kill = _killer(c, rng, n, kills)
                # A fold emits no items: kill on the progress clock instead.
                total = None
                for event in stream.events(client):
                    if isinstance(event, squire.Progress):
                        maybe_kill(event.completed)
                    elif isinstance(event, squire.FoldValue):
                        total = event.value
                assert total == sum(i * i for i in range(n))
                executions = ledger.executions(tag)
                assert set(executions) == set(range(n))
                assert sum(executions.values()) - n <= _in_flight_bound(kills[0])
    figures.add("orchestrator SIGKILL, map -> fold", "orchestrator SIGKILLs", kills[0])


def test_orchestrator_sigkill_during_chain(ledger: Ledger, env: dict[str, str], logs: Path,
                                           figures: Figures) -> None:
    rng = random.Random(_seed())
    n = 3_000
    kills = [0]
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, [f"w{i}" for i in range(WORKERS)], concurrency=CONCURRENCY)
        with squire.Client(c.target) as client:
            stream = (squire.IndexedStream.from_iterable(range(n))
                      .map("fault_square", tag="chain1", sleep=0.001)
                      .map("fault_square", tag="chain2"))
            run = consume(stream.events(client), ledger, "chain", _killer(c, rng, n, kills))
            wrong = [i for i in range(n) if run.values.get(i) != (i * i) ** 2]
            assert not wrong, f"{len(wrong)} wrong values, e.g. {wrong[:5]}"
            tally = ledger.tally("chain", n)
            assert not tally.lost and not tally.duplicated
            first, second = ledger.executions("chain1"), ledger.executions("chain2")
            assert set(first) == set(range(n))
            # Stage 1's journaled outcomes are not computed again for stage 2.
            assert sum(first.values()) - n <= _in_flight_bound(kills[0])
            assert len(second) == n
    figures.add("orchestrator SIGKILL, chain of two maps", "orchestrator SIGKILLs", kills[0])


def test_orchestrator_sigkill_during_a_leased_channel(ledger: Ledger, env: dict[str, str],
                                                      logs: Path, figures: Figures) -> None:
    """The leased-channel API across kills: one thread publishes, the main
    thread receives; the SDK resends what a broken Publish call had not had
    acknowledged (ids the channel has are left out) and resubscribes with
    how many results it has."""
    rng = random.Random(_seed())
    n = 3_000
    tag = "ochannel"
    kills = [0]
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, [f"w{i}" for i in range(WORKERS)], concurrency=CONCURRENCY)
        with squire.Client(c.target) as client, client.lease_channel() as channel:
            values = stream_channel(channel, ledger, tag, n, _killer(c, rng, n, kills))
            tally = ledger.tally(tag, n)
            tally.assert_exactly_once()
            assert values == {i: i * i for i in range(n)}
            assert tally.re_executions <= _in_flight_bound(kills[0])
            assert kills[0] >= 1
            assert channel.receiver.resubscribed >= 1
            assert channel.sender._publisher.resent >= 1
            published, duplicates = (channel.sender._publisher.published,
                                     channel.sender._publisher.duplicates)
            # What a broken call had sent went again; the channel had some of it.
            assert published + duplicates == n and duplicates >= 1, (published, duplicates)
    figures.add("orchestrator SIGKILL, leased channel", "tasks", f"{n:,}")
    figures.add("orchestrator SIGKILL, leased channel", "orchestrator SIGKILLs", kills[0])
    figures.add("orchestrator SIGKILL, leased channel", "lost / duplicated results", "0 / 0")
    figures.add("orchestrator SIGKILL, leased channel", "tasks executed again",
                tally.re_executions)
    figures.add("orchestrator SIGKILL, leased channel", "tasks resent, left out as duplicates",
                duplicates)
