"""A real Prometheus server scrapes a real orchestrator and worker on
127.0.0.1; the test reads the figures back through Prometheus' HTTP API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def prometheus_stack(tmp_path: Path, *, orchestrator_args: tuple[str, ...] = (),
                     env: dict[str, str] | None = None, token: str | None = None,
                     ) -> Iterator[tuple[procs.Cluster, int]]:
    orch_metrics, worker_metrics, prom_port = procs.free_port(), procs.free_port(), procs.free_port()
    with procs.cluster(metrics_port=orch_metrics, env=env, token=token,
                       orchestrator_args=("--metrics-host", "127.0.0.1", *orchestrator_args)) as c:
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


@pytest.fixture
def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    with prometheus_stack(tmp_path) as both:
        yield both


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


def test_prometheus_sees_each_tenant(tmp_path: Path) -> None:
    tokens = {t: f"{t}-" + secrets.token_hex(16) for t in ("a", "b", "ops")}
    file = tmp_path / "tenants.toml"
    file.write_text("".join(
        f'[tenants.{t}]\ntoken_sha256 = ["{hashlib.sha256(tok.encode()).hexdigest()}"]\n'
        + ("admin = true\n" if t == "ops" else "") for t, tok in tokens.items()))
    worker_token = "wt-" + secrets.token_hex(16)
    with prometheus_stack(tmp_path, orchestrator_args=("--tenants", str(file)),
                          env={"SQUIRE_WORKER_TOKEN": worker_token}, token=tokens["ops"]) as (
            cluster, prom):
        with squire.Client(cluster.target, token=tokens["a"]) as a, \
                squire.Client(cluster.target, token=tokens["b"]) as b:
            assert IndexedStream.from_iterable(range(10)).map("fib_at").run(a)[9] == 34
            handle = b.lease_channel()
            handle.sender.publish("nobody_offers_this", list(range(7)))
            try:
                procs.wait_until(
                    lambda: scalar(prom, 'squire_tenant_tasks_completed_total{tenant="a"}') == 10,
                    timeout=30, message="10 tasks completed for tenant a")
                procs.wait_until(
                    lambda: scalar(prom, 'squire_tenant_queued_tasks{tenant="b"}') == 7,
                    timeout=30, message="7 tasks queued for tenant b")
                assert scalar(prom, 'squire_tenant_queued_tasks{tenant="a"}') == 0
                assert scalar(prom, 'squire_tenant_tasks_completed_total{tenant="ops"}') == 0
                # Labels are the file's tenants only.
                labels = {r["metric"]["tenant"] for r in query(prom, "squire_tenant_queued_tasks")}
                assert labels == {"a", "b", "ops"}
            finally:
                handle.release()
