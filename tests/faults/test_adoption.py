"""Adoption across an orchestrator SIGKILL: what the workers were running
when it died is not run again (issue 15).

Two workers run four long tasks of an eight-task map when the orchestrator
is SIGKILLed and restarted on the same port and journal. The workers run on;
their next hello names what they hold, the new orchestrator (which waits
``--adoption-grace`` before it dispatches) leases those tasks back to them,
and their results count. Every task runs exactly once, every value reaches
the caller exactly once, and the metrics say four tasks were adopted.
"""

from __future__ import annotations

import threading
from pathlib import Path

import squire
from procs import cluster, free_port, wait_until

from .support import (
    Figures,
    Ledger,
    MapRun,
    assert_squares,
    consume,
    outcome,
    scrape,
    square_map,
    start_workers,
)

N = 8
SLEEP = 2.5  # long enough to be running at the kill, short enough for the suite


def test_running_tasks_are_adopted_not_run_again(
    ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures
) -> None:
    tag = "adopt"
    metrics_port = free_port()
    with cluster(env=env, log_dir=logs, metrics_port=metrics_port) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        with squire.Client(c.target) as client:
            result: list[MapRun | BaseException] = []

            def call() -> None:
                try:
                    stream = square_map(N, tag, sleep=SLEEP)
                    result.append(consume(stream.events(client), ledger, tag))
                except BaseException as exc:  # raised below, in the test
                    result.append(exc)

            caller = threading.Thread(target=call, daemon=True)
            caller.start()
            # All four slots are busy: the first four elements have started.
            wait_until(lambda: sum(ledger.executions(tag).values()) == 4, 30,
                       message="four tasks running")
            c.kill_orchestrator()
            c.restart_orchestrator(wait=True)
            caller.join(timeout=90)
            assert not caller.is_alive(), "the directive did not finish"
        (run,) = result
        if isinstance(run, BaseException):
            raise run
        assert_squares(run.values, N)
        tally = ledger.tally(tag, N)
        tally.assert_exactly_once()
        assert tally.re_executions == 0, f"{tally.re_executions} tasks ran twice"
        assert outcome(scrape(metrics_port), "adopted") == 4
    figures.add("orchestrator SIGKILL with 4 tasks running", "tasks adopted", 4)
    figures.add("orchestrator SIGKILL with 4 tasks running", "tasks executed again", 0)
