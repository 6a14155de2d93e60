"""Scenario 4: a fatal error in one directive while another runs on the same workers.

The failing directive ends with the operation's own message; its long task,
already running at a worker, observes the abort signal within 1 s of the
failure (the orchestrator broadcasts worker IPC for the routing key); the
other directive is untouched and completes exactly once.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import squire
from procs import cluster, wait_until

from .support import (
    Figures,
    Ledger,
    MapRun,
    assert_squares,
    consume,
    directive_gone,
    square_map,
    start_workers,
)

OTHER_N = 4_000
MESSAGE = "This operation will always fail."


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_fatal_error_fails_one_directive_and_aborts_its_running_task(
    executor: str, ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures
) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1", "w2"], concurrency=2, executor=executor)
        out: list[Any] = []

        def other() -> None:
            try:
                with squire.Client(c.target) as client:
                    out.append(consume(square_map(OTHER_N, "other", sleep=0.001).events(client),
                                       ledger, "other"))
            except BaseException as exc:
                out.append(exc)

        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        wait_until(lambda: ledger.delivered("other") > 100, 30, message="the other directive")

        stream = squire.IndexedStream.from_iterable(range(50)).map(
            "fault_fatal", tag="fatal", fail_at=30, hold_at=3, message=MESSAGE)
        with squire.Client(c.target) as client:
            with pytest.raises(squire.DirectiveFailed) as failed:
                run = stream.events(client)
                consume(run, ledger, "fatal")
            raised = time.monotonic()
            assert f"Fatal operation error: {MESSAGE}" in failed.value.message
            assert failed.value.code == "ABORTED"
            wait_until(lambda: ledger.marker("abort-fatal-3"), 5,
                       message="the long task of the failed directive to observe abort")
            failed_at = ledger.marker("failed-fatal-30")
            abort_seen = ledger.marker("abort-fatal-3")
            assert failed_at is not None and abort_seen is not None
            latency = abort_seen - failed_at
            assert 0 <= latency < 1.0, f"abort observed {latency:.3f} s after the failure"
            assert run.directive_id is not None
            wait_until(lambda: directive_gone(c, run.directive_id), 2,
                       message="the failed directive to leave the status")

        thread.join(timeout=60)
        assert out and isinstance(out[0], MapRun), f"the other directive failed: {out!r}"
        ledger.tally("other", OTHER_N).assert_exactly_once()
        assert_squares(out[0].values, OTHER_N)
        # the failed directive delivered no index twice either
        assert not ledger.tally("fatal", 50).duplicated
        assert all(c.workers[w].poll() is None for w in ("w0", "w1", "w2"))
    label = f"4. fatal error ({executor} executor)"
    figures.add(label, "abort observed after the failure, ms", round(latency * 1000))
    figures.add(label, "client saw the failure after, ms", round((raised - failed_at) * 1000))
    figures.add(label, "concurrent directive", f"{OTHER_N:,} tasks, lost 0, duplicated 0")
