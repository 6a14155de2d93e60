"""Alerts and dashboard against the real services: every metric they name is
exposed by a running orchestrator or worker, promtool accepts and unit-tests
the rules, and the probes the manifests declare answer as expected."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from .support import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARDS,
    DOCKER,
    K8S,
    PROMETHEUS_CONFIG,
    PROMQL_METRIC,
    SYNTHETIC,
    Services,
    alert_rules,
    dashboard_queries,
    explain_missing,
    exposed_series,
    free_port,
    grafana_to_promql,
    http_get,
    load_dashboard,
    rel,
    run,
    wait_ready,
    wait_until,
)


@pytest.fixture(scope="module")
def series(services: Services) -> set[str]:
    """Series names the orchestrator and the worker expose together."""
    return (exposed_series(services.metrics(services.orchestrator_metrics_port))
            | exposed_series(services.metrics(services.worker_metrics_port)))


def test_exposed_series_names_follow_the_metric_types() -> None:
    text = "\n".join([
        "# TYPE a_total counter", "a_total 1.0", "a_created 1.7e9",
        "# TYPE b histogram",
        "# TYPE c gauge", "c 2.0",
        "# TYPE d_total gauge",
    ])
    assert exposed_series(text) == {"a_total", "b_bucket", "b_sum", "b_count", "c", "d_total"}


def test_the_services_expose_the_documented_metrics(series: set[str]) -> None:
    documented = {
        "squire_tasks_published_total", "squire_tasks_dispatched_total",
        "squire_task_outcomes_total", "squire_worker_ipc_sent_total",
        "squire_directives_cancelled_total", "squire_queued_tasks", "squire_queue_depth",
        "squire_tasks_in_flight", "squire_workers_connected", "squire_connected_capacity",
        "squire_channels_active", "squire_directives_active",
        "squire_tenant_queued_tasks", "squire_tenant_tasks_in_flight",
        "squire_tenant_directives_active", "squire_tenant_tasks_completed_total",
        "squire_tenant_throttled_total",
        "squire_task_latency_seconds_bucket", "squire_directive_duration_seconds_bucket",
        "squire_worker_tasks_total", "squire_worker_execution_seconds_bucket",
        "squire_worker_retries_total", "squire_worker_busy_slots", "squire_worker_capacity",
        "squire_worker_reconnects_total", "squire_worker_ready",
    }
    assert documented <= series, sorted(documented - series)


def check_names(exprs: list[str], series: set[str], where: str) -> None:
    names = {n for e in exprs for n in PROMQL_METRIC.findall(e)}
    assert names, f"{where} names no squire metric at all"
    missing = [explain_missing(n, series) for n in sorted(names - series)]
    assert not missing, f"{where}:\n" + "\n".join(missing)


def test_alerts_name_only_exposed_metrics(series: set[str]) -> None:
    exprs = [rule["expr"] for rule in alert_rules()]
    check_names(exprs, series, rel(ALERTS))
    # Non-squire names must be series Prometheus makes itself (up).
    for expr in exprs:
        if "squire_" not in expr:
            assert any(name in expr for name in SYNTHETIC), expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=rel)
def test_dashboard_names_only_exposed_metrics(path: Path, series: set[str]) -> None:
    check_names(list(dashboard_queries(load_dashboard(path))), series, rel(path))


def test_the_autoscaling_docs_name_exposed_metrics(series: set[str]) -> None:
    values = (K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text()
    rules = yaml.safe_load(values)["rules"]["external"]
    check_names([r["seriesQuery"] + r["name"]["as"] for r in rules], series,
                "prometheus-adapter-values.yaml")


@pytest.mark.parametrize("path", DASHBOARDS, ids=rel)
def test_dashboard_panels(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    # the panels the README promises
    assert 'squire_task_outcomes_total{namespace=~"$namespace", outcome="ok"}' in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(squire_task_latency_seconds_bucket" in exprs
    for name in ("squire_queued_tasks", "sum by (operation) (squire_queue_depth{",
                 "squire_workers_connected", "squire_connected_capacity",
                 "squire_worker_busy_slots", 'outcome!="ok"',
                 "squire_directive_duration_seconds_bucket"):
        assert name in exprs, name
    datasources = {json.dumps(t.get("datasource", p.get("datasource")))
                   for p in panels for t in p["targets"]}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}


# ------------------------------------------------------------------ promtool

def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(ALERTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_the_alerts(promtool: str) -> None:
    result = run([promtool, "test", "rules", str(ALERTS_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {t["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for t in test.get("alert_rule_test", [])}
    untested = {rule["alert"] for rule in alert_rules()} - tested
    assert not untested, f"alerts without a unit test in {rel(ALERTS_TEST)}: {sorted(untested)}"


def test_promtool_checks_the_local_prometheus_config(promtool: str) -> None:
    result = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=rel)
def test_dashboard_queries_are_valid_promql(path: Path, promtool: str, tmp_path: Path) -> None:
    # promtool parses PromQL only inside rule files: wrap each query in a rule.
    queries = list(dashboard_queries(load_dashboard(path)))
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(q)}
             for i, q in enumerate(q for q in queries if not q.startswith("label_values("))]
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ probes

def test_orchestrator_health_is_what_the_grpc_probes_ask(services: Services) -> None:
    # the manifests' native gRPC probes ask grpc.health.v1 for service "" on
    # the plaintext --health-port (the kubelet cannot speak TLS)
    with grpc.insecure_channel(f"127.0.0.1:{services.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_health_port_serves_health_alone(services: Services) -> None:
    # plaintext, so it must not carry the squire API (payloads, tokens)
    with grpc.insecure_channel(f"127.0.0.1:{services.health_port}") as channel:
        stub = pb_grpc.StatusServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStatus(pb.GetStatusRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("path", ["/readyz", "/healthz", "/metrics"])
def test_worker_answers_the_probe_paths(services: Services, path: str) -> None:
    assert http_get(services.worker_metrics_port, path)[0] == 200


def test_custom_worker_example_runs_like_the_extended_image(services: Services) -> None:
    """deploy/docker/custom-worker: /app on PYTHONPATH, SQUIRE_OPS names the
    module, no --ops flag, as the manifests run the image."""
    port = free_port()
    env = {"PYTHONPATH": str(DOCKER / "custom-worker"), "SQUIRE_OPS": "my_ops"}
    with services.start_worker("custom-worker", "--executor", "process", "--concurrency", "1",
                               "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
                               "--drain-grace", "1", env=env) as worker:
        wait_ready(worker, port)
        with grpc.insecure_channel(f"127.0.0.1:{services.grpc_port}") as channel:
            status = pb_grpc.StatusServiceStub(channel)

            def offered() -> bool:
                workers = status.GetStatus(pb.GetStatusRequest(), timeout=5).workers
                return any("word_count" in w.operations and "max" in w.monoids
                           for w in workers)

            wait_until(offered, 10, "the custom worker to offer word_count and max")
    # drained on SIGTERM and exited cleanly
    assert worker.proc.returncode == 0, worker.log.read_text()[-4000:]
