"""Backpressure: a big map whose client stops reading results.

The orchestrator runs with a tiny ``--directive-window`` (64 elements). The
client streams a lazy source of ~1 KiB elements and does not read the
results. The pipeline must stall: the orchestrator stops reading input once
64 elements are unfinished or unsent, gRPC flow control stops the client's
generator, and the orchestrator's memory stays flat. When the client reads
again, the map completes with every value correct.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import squire
from procs import Cluster, cluster, wait_until

from .support import Figures, Ledger, directive_gone, start_workers

WINDOW = 64
PAD = "#" * 1000
RSS_BOUND_MIB = 64


class Source:
    """A lazy source that counts how far gRPC pulled it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.n):
            self.pulled = i + 1
            yield {"i": i, "pad": PAD}


def _stalled(c: Cluster, directive_id: str) -> tuple[int, int] | None:
    """(received, completed) once the directive's pipeline is full and idle."""
    [d] = [d for d in c.status().directives if d.directive_id == directive_id]
    p = d.progress
    if p.received and p.queued == 0 and p.leased == 0 and p.completed == p.received:
        return p.received, p.completed
    return None


def _steady(c: Cluster, directive_id: str) -> tuple[int, int] | None:
    """``_stalled``, and still so a moment later: workers fast enough to finish
    everything received so far look stalled for an instant while input still
    flows (the batched executors made that instant likely)."""
    first = _stalled(c, directive_id)
    if first is None:
        return None
    time.sleep(0.3)
    return first if _stalled(c, directive_id) == first else None


def _read_all(run: squire.DirectiveRun, ledger: Ledger, tag: str) -> dict[int, Any]:
    values: dict[int, Any] = {}
    for event in run:
        if isinstance(event, squire.ItemBatch):
            for index, value in event.items:
                ledger.deliver(tag, index)
                values[index] = value
    return values


def _check(values: dict[int, Any], ledger: Ledger, tag: str, n: int) -> None:
    ledger.tally(tag, n).assert_exactly_once()
    wrong = [i for i in range(n) if values[i]["i"] != i or values[i]["sq"] != i * i
             or values[i]["pad"] != PAD]
    assert not wrong, wrong[:10]


def _stall(c: Cluster, client: squire.Client, source: Source) -> tuple[squire.DirectiveRun, int]:
    """Start a map over ``source``, read nothing, return once it has stalled."""
    stream = squire.IndexedStream.from_iterable(source, total=source.n).map(
        "fault_heavy", tag="stall")
    run = stream.events(client)
    started = next(run)  # and read nothing more
    assert isinstance(started, squire.DirectiveStarted)
    directive_id = started.directive_id
    received, _ = wait_until(lambda: _steady(c, directive_id), 30,
                             message="the directive to stall on its unread results")
    # stalled for good: nothing moves while the client does not read
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert _stalled(c, directive_id) == (received, received)
        time.sleep(0.1)
    return run, received


def _backpressure(n: int, ledger: Ledger, env: dict[str, str], logs: Path,
                  figures: Figures, label: str) -> None:
    args = ("--directive-window", str(WINDOW))
    with cluster(orchestrator_args=args, env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1", "w2"], concurrency=2, executor="thread")
        with squire.Client(c.target) as client:
            # warm-up, so the measurement sees steady-state allocations only
            warm = squire.IndexedStream.from_iterable(Source(2_000)).map(
                "fault_heavy", tag="warm")
            _check(_read_all(warm.events(client), ledger, "warm"), ledger, "warm", 2_000)
            rss_before = c.rss_kib()

            source = Source(n)
            run, received = _stall(c, client, source)
            pulled = source.pulled
            growth = (c.rss_kib() - rss_before) / 1024
            # The window bounds what the orchestrator holds; beyond it sits
            # only what HTTP/2 flow control lets into the client's buffers.
            assert received < n // 2, received
            assert pulled < n * 3 // 4, f"the client's generator was pulled {pulled} of {n} times"
            assert growth < RSS_BOUND_MIB, f"orchestrator RSS grew {growth:.1f} MiB"

            start = time.monotonic()
            values = _read_all(run, ledger, "stall")
            seconds = time.monotonic() - start
            _check(values, ledger, "stall", n)
            growth_after = (c.rss_kib() - rss_before) / 1024
            assert growth_after < RSS_BOUND_MIB
    figures.add(label, "directive window", WINDOW)
    figures.add(label, "map size (elements of ~1 KiB)", n)
    figures.add(label, "unread results: source elements pulled by gRPC", pulled)
    figures.add(label, "unread results: elements the orchestrator took in", received)
    figures.add(label, f"orchestrator RSS growth while stalled, MiB (bound {RSS_BOUND_MIB})",
                round(growth, 1))
    figures.add(label, "then read to the end, s", round(seconds, 1))
    figures.add(label, "orchestrator RSS growth after the whole map, MiB", round(growth_after, 1))


def test_backpressure_unread_results(ledger: Ledger, env: dict[str, str], logs: Path,
                                     figures: Figures) -> None:
    _backpressure(40_000, ledger, env, logs, figures, "backpressure")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_backpressure_unread_results_long(ledger: Ledger, env: dict[str, str], logs: Path,
                                          figures: Figures) -> None:
    _backpressure(200_000, ledger, env, logs, figures, "backpressure (slow run)")


# Regression: a client cancel racing a write blocked by a full stream once
# left the directive behind (the handler's cleanup awaited before cancelling).
def test_cancel_a_stalled_directive(ledger: Ledger, env: dict[str, str], logs: Path) -> None:
    args = ("--directive-window", str(WINDOW), "--grace", "0")
    with cluster(orchestrator_args=args, env=env, log_dir=logs) as c:
        start_workers(c, ["w0"], concurrency=2, executor="thread")
        with squire.Client(c.target) as client:
            for _ in range(3):  # the race is lost only sometimes
                run, _ = _stall(c, client, Source(100_000))
                run.cancel()
                assert run.directive_id is not None
                wait_until(lambda: directive_gone(c, run.directive_id), 2,  # noqa: B023
                           message="the stalled directive to go after cancel")
