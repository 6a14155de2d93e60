"""SIGTERM the orchestrator during a map (a rolling update of its Deployment).

Without a journal (``--store memory:``): while it drains, gRPC health says
NOT_SERVING and new directives are refused with UNAVAILABLE; the running
directive gets ``--grace`` seconds and delivers every index exactly once;
then the workers are told to drain and the process exits 0.

With the journal (the default): it stops at once (exit 0) without waiting
for the directive, whose call ends with UNAVAILABLE; the workers are not
drained; a new orchestrator on the same journal goes on, the SDK
reattaches, and every index arrives exactly once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
import squire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from procs import cluster

from .support import Figures, Ledger, assert_squares, consume, square_map, start_workers

N = 600
GRACE = 20.0


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(response.status)


def test_sigterm_lets_the_running_directive_finish(ledger: Ledger, env: dict[str, str],
                                                  logs: Path, figures: Figures) -> None:
    # Without a journal: the running directive must finish within the grace.
    args = ("--grace", str(GRACE), "--store", "memory:")
    with cluster(env=env, log_dir=logs, orchestrator_args=args) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        assert _health(c.target) == health_pb2.HealthCheckResponse.SERVING
        seen: dict[str, object] = {}

        def terminate(delivered: int) -> None:
            if "sent" in seen or delivered < N // 3:
                return
            c.orchestrator.send_signal(signal.SIGTERM)
            seen["sent"] = time.monotonic()
            # Draining: health flips, and new work is refused, while the
            # running directive goes on.
            health = health_pb2.HealthCheckResponse
            deadline = time.monotonic() + 10
            while _health(c.target) != health.NOT_SERVING:
                assert time.monotonic() < deadline, "health never went NOT_SERVING"
                time.sleep(0.01)
            with squire.Client(c.target) as other, pytest.raises(squire.Unavailable,
                                                                match="shutting down"):
                square_map(3, "refused").run(other)
            seen["refused"] = True

        with squire.Client(c.target) as client:
            run = consume(square_map(N, "orch-term", sleep=0.005).events(client), ledger,
                          "orch-term", terminate)
        assert seen.get("refused"), c.log("orchestrator")
        ledger.tally("orch-term", N).assert_exactly_once()
        assert_squares(run.values, N)
        code = c.orchestrator.wait(timeout=GRACE + 10)
        seconds = time.monotonic() - float(seen["sent"])  # type: ignore[arg-type]
        assert code == 0, c.log("orchestrator")
        assert not ledger.executions("refused"), "a refused directive ran tasks"
    figures.add("6b. SIGTERM the orchestrator", "tasks", f"{N:,}")
    figures.add("6b. SIGTERM the orchestrator", "exit code", code)
    figures.add("6b. SIGTERM the orchestrator", "exit after SIGTERM, s (grace 20 s)",
                round(seconds, 2))
    figures.add("6b. SIGTERM the orchestrator", "lost / duplicated deliveries", "0 / 0")


def test_sigterm_with_a_journal_stops_at_once_and_the_next_start_goes_on(
        ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures) -> None:
    with cluster(env=env, log_dir=logs, orchestrator_args=("--grace", str(GRACE))) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        seen: dict[str, float] = {}

        def restart(delivered: int) -> None:
            if "sent" in seen or delivered < N // 3:
                return
            seen["sent"] = time.monotonic()
            c.orchestrator.send_signal(signal.SIGTERM)
            seen["code"] = c.orchestrator.wait(timeout=GRACE)
            seen["stopped"] = time.monotonic() - seen["sent"]
            c.restart_orchestrator()

        with squire.Client(c.target) as client:
            run = consume(square_map(N, "orch-term-j", sleep=0.005).events(client), ledger,
                          "orch-term-j", restart)
        assert seen.get("code") == 0, c.log("orchestrator")
        assert seen["stopped"] < GRACE / 2, "it waited for the directive"
        tally = ledger.tally("orch-term-j", N)
        tally.assert_exactly_once()
        assert_squares(run.values, N)
        # The workers were not drained away: the same two serve the new start.
        c.wait_for_workers({"w0", "w1"})
    label = "6c. SIGTERM the orchestrator (journal), restart"
    figures.add(label, "tasks", f"{N:,}")
    figures.add(label, "exit after SIGTERM, s", round(seen["stopped"], 2))
    figures.add(label, "lost / duplicated deliveries", "0 / 0")
    figures.add(label, "tasks executed again", tally.re_executions)
