"""A real Prometheus server scrapes a real orchestrator and worker on
127.0.0.1; the test reads the figures back through Prometheus' HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import procs
import pytest
import squire
from squire import IndexedStream


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    assert path, "Debian's prometheus package is required (apt-get install prometheus); .ci/run installs it"
    return path


def query(port: int, promql: str) -> list[dict]:  # type: ignore[type-arg]
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


def scalar(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if result else None


@pytest.fixture
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    orch_metrics, worker_metrics, prom_port = procs.free_port(), procs.free_port(), procs.free_port()
    with procs.cluster(metrics_port=orch_metrics,
                       orchestrator_args=("--metrics-host", "127.0.0.1")) as c:
        c.start_worker("w1", executor="inline",
                       extra=("--metrics-port", str(worker_metrics), "--metrics-host", "127.0.0.1"))
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            f"  - job_name: squire-orchestrator\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{orch_metrics}']\n"
            f"  - job_name: squire-worker\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{worker_metrics}']\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [prometheus_binary(), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            def both_up() -> bool:
                try:
                    up = query(prom_port, "up")
                except OSError:
                    return False
                return len(up) == 2 and all(r["value"][1] == "1" for r in up)

            procs.wait_until(both_up, timeout=60, message="Prometheus to scrape both services")
            yield c, prom_port
        finally:
            prom.terminate()
            prom.wait(timeout=30)
            log.close()


def test_prometheus_sees_completed_tasks_and_queue_depth(stack) -> None:  # type: ignore[no-untyped-def]
    cluster, prom = stack
    with squire.Client(cluster.target) as client:
        assert IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum").run(client) == 143
        # ten map tasks and at least one fold combine completed ok
        expected_ok = int(client.status()["workers"][0]["completed"])
        procs.wait_until(
            lambda: scalar(prom, 'squire_task_outcomes_total{outcome="ok"}') == expected_ok,
            timeout=30, message=f"Prometheus to report {expected_ok} ok tasks",
        )
        procs.wait_until(lambda: scalar(prom, "squire_queued_tasks") == 0, timeout=30)
        worker_ok = 'sum(squire_worker_tasks_total{outcome="ok"})'
        procs.wait_until(lambda: scalar(prom, worker_ok) == expected_ok, timeout=30,
                         message="the worker's own count of ok tasks")

        # Tasks nobody offers stay queued: Prometheus reports the depth.
        handle = client.lease_channel()
        handle.sender.publish("nobody_offers_this", list(range(25)))
        try:
            procs.wait_until(
                lambda: scalar(prom, 'squire_queue_depth{operation="nobody_offers_this"}') == 25,
                timeout=30, message="a queue depth of 25",
            )
            assert scalar(prom, "squire_queued_tasks") == 25
            assert scalar(prom, "squire_workers_connected") == 1
        finally:
            handle.release()
