"""SIGTERM the orchestrator during a map (a rolling update of its Deployment).

While it drains, gRPC health says NOT_SERVING and new directives are refused
with UNAVAILABLE; the running directive gets ``--grace`` seconds and
delivers every index exactly once; then the workers are told to drain and
the process exits 0.
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
    with cluster(env=env, log_dir=logs, orchestrator_args=("--grace", str(GRACE))) as c:
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
