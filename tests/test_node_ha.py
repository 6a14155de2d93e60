"""The Node client given several orchestrator addresses (issue 16): two
orchestrator replicas on one real Postgres, two workers given both
addresses, and a Node script (clients/node/test/ha_map.js) running a map
with ``new Client("a,b")`` while the leader is SIGKILLed (the standby takes
over within the lease TTL) or SIGTERMed (a rolling upgrade: it resigns and
the standby leads within a second). Every index arrives exactly once with
its exact value, and no directive fails."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import Replica, entry_point, wait_until

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
SCRIPT = NODE_DIR / "test" / "ha_map.js"
OPS = "squire_examples.ops"
TTL = 4.0


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


@pytest.fixture
def replicas(pg_url: str, logs: Path) -> Iterator[tuple[Replica, Replica]]:
    assert shutil.which("node"), "Node.js 20+ is required (apt-get install -y nodejs npm)"
    assert (NODE_DIR / "node_modules").is_dir(), "run npm ci in clients/node first"
    started: list[Replica] = []
    workers: list[subprocess.Popen[bytes]] = []
    try:
        a = Replica("orchestrator-a", pg_url, logs, ttl=TTL)
        started.append(a)
        wait_until(lambda: a.health() == "SERVING", 30, message="the first replica leading")
        b = Replica("orchestrator-b", pg_url, logs, ttl=TTL)
        started.append(b)
        wait_until(lambda: b.health() == "NOT_SERVING", 30, message="the second one standing by")
        for i in range(2):
            with open(logs / f"worker-{i}.log", "ab") as log:
                workers.append(subprocess.Popen(
                    [entry_point("squire-worker"), "--orchestrator", f"{a.address},{b.address}",
                     "--ops", OPS, "--concurrency", "2", "--executor", "thread",
                     "--worker-id", f"w{i}", "--metrics-port", "0"],
                    stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        yield a, b
    finally:
        for p in [*workers, *(r.proc for r in started)]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


class NodeMap:
    """The Node script, its stdout read line by line on a thread."""

    def __init__(self, target: str, n: int, sleep: float, logs: Path) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.delivered = 0
        self.final: dict[str, Any] | None = None
        self.stderr = open(logs / "node.log", "wb")  # closed in wait()
        self.proc = subprocess.Popen(
            ["node", str(SCRIPT), target, str(n), str(sleep)], cwd=NODE_DIR,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = json.loads(raw)
            if "delivered" in line and "done" not in line:
                self.delivered = line["delivered"]
            else:
                self.final = line

    def wait(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr.close()
        self.reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        assert self.final is not None, f"the Node script printed no result (exit {self.proc.returncode})"
        return self.final


def check(result: dict[str, Any], n: int, logs: Path) -> None:
    print(f"the Node script: {result}")
    assert "error" not in result, f"the map failed: {result}; logs in {logs}"
    assert result["done"] and result["delivered"] == n, result
    assert result["lost"] == [] and result["duplicated"] == [] and result["wrong"] == [], result
    assert result["duplicatesDropped"] == 0, result
    assert result["smallErrors"] == [] and result["smallRuns"] > 0, result


@pytest.mark.timeout(120)
def test_the_node_client_follows_the_leader_through_a_sigkill(
    replicas: tuple[Replica, Replica], logs: Path
) -> None:
    a, b = replicas
    n = 400
    # The standby first: the client finds the leader by itself.
    run = NodeMap(f"{b.address},{a.address}", n, 0.02, logs)
    wait_until(lambda: run.delivered >= n // 4 or run.proc.poll() is not None, 60,
               message="a quarter delivered")
    assert run.proc.poll() is None, f"the Node script ended early: {run.final}"
    killed = time.monotonic()
    a.stop(signal.SIGKILL)
    wait_until(lambda: b.health() == "SERVING", 30, message="the standby taking over")
    took_over = time.monotonic() - killed
    result = run.wait(60)
    check(result, n, logs)
    assert result["reattached"] >= 1, result
    assert took_over < TTL + 5, f"takeover after {took_over:.2f} s"


@pytest.mark.timeout(120)
def test_the_node_client_rides_a_rolling_upgrade(
    replicas: tuple[Replica, Replica], logs: Path
) -> None:
    a, b = replicas
    n = 300
    run = NodeMap(f"{a.address},{b.address}", n, 0.02, logs)
    wait_until(lambda: run.delivered >= n // 4 or run.proc.poll() is not None, 60,
               message="a quarter delivered")
    assert run.proc.poll() is None, f"the Node script ended early: {run.final}"
    assert a.stop(signal.SIGTERM) == 0  # it resigns the lease on its way out
    wait_until(lambda: b.health() == "SERVING", 30, message="the standby taking over")
    a.start()  # the upgraded replica comes back, as the standby now
    result = run.wait(60)
    check(result, n, logs)
    wait_until(lambda: a.health() == "NOT_SERVING", 30, message="the old leader standing by")
