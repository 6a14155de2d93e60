"""Scenario 5: transient errors are retried by the worker, then turn fatal.

An operation that fails transiently twice per element, then succeeds,
completes with every retry counted (in the directive's Progress and in the
orchestrator's metrics). One that keeps failing turns fatal after its retry
budget, and the directive fails saying so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import squire
from procs import cluster, free_port

from .support import (
    Figures,
    Ledger,
    assert_squares,
    consume,
    outcome,
    scrape,
    start_workers,
)

N = 200
FAILURES = 2


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_transient_errors_recover_and_exhaust(executor: str, ledger: Ledger,
                                               env: dict[str, str], logs: Path,
                                               figures: Figures) -> None:
    port = free_port()
    with cluster(env=env, log_dir=logs, metrics_port=port) as c:
        start_workers(c, ["w0", "w1"], concurrency=2, executor=executor)
        with squire.Client(c.target) as client:
            flaky = squire.IndexedStream.from_iterable(range(N)).map(
                "fault_flaky", tag="flaky", failures=FAILURES)
            run = consume(flaky.events(client), ledger, "flaky")
            tally = ledger.tally("flaky", N)
            tally.assert_exactly_once()
            assert_squares(run.values, N)
            # every element ran 1 + FAILURES times, all retries counted
            assert set(tally.executions.values()) == {1 + FAILURES}
            assert run.progress is not None
            assert run.progress.retries == N * FAILURES
            assert outcome(scrape(port), "retried") == N * FAILURES

            stuck = squire.IndexedStream.from_iterable([7]).map(
                "fault_always_transient", tag="stuck", max_retries=2)
            with pytest.raises(squire.DirectiveFailed) as failed:
                consume(stuck.events(client), ledger, "stuck")
            message = failed.value.message
            assert "Fatal operation error: dependency still down for element 7" in message
            assert "retries exhausted" in message
            assert ledger.executions("stuck")[7] == 3  # the first run and 2 retries
    figures.add(f"5. transient errors ({executor} executor)", "elements x transient failures",
                f"{N} x {FAILURES}")
    figures.add(f"5. transient errors ({executor} executor)", "retries counted in Progress",
                run.progress.retries)
    figures.add(f"5. transient errors ({executor} executor)",
                "retries counted in metrics (squire_task_outcomes_total)", N * FAILURES)
    figures.add(f"5. transient errors ({executor} executor)",
                "always-failing element: executions before fatal", 3)
