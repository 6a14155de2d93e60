"""The manifests agree with the code: ports, flags, grace periods, capacity,
the worker's target, the image's user, and the autoscaling metric."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator_service.__main__ import DEFAULT_PORT, parse_args
from orchestrator_service._metrics import DEFAULT_METRICS_PORT as ORCHESTRATOR_METRICS_PORT
from worker_service._cli import parse_config
from worker_service._probe import DEFAULT_METRICS_PORT as WORKER_METRICS_PORT

from .support import (
    ALERTS,
    BIN,
    DEPLOY,
    DOCKERFILES,
    PROMETHEUSRULE,
    PROMQL_METRIC,
    Services,
    by_kind,
    containers,
    cpu_cores,
    dockerfile_stages,
    exposed_series,
    flags,
    image_user_id,
    kustomizations,
    one,
    port_number,
    rel,
    run,
)

DIRS = kustomizations()
Docs = dict[Path, list[dict[str, Any]]]


def container(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    (only,) = spec["containers"]
    return dict(only)


@functools.cache
def help_flags(entry_point: str) -> set[str]:
    result = run([str(BIN / entry_point), "--help"])
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_orchestrator_ports_are_the_service_defaults(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    c = container(docs, "squire-orchestrator")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": DEFAULT_PORT, "metrics": ORCHESTRATOR_METRICS_PORT}
    # native gRPC probes (grpc.health.v1) on the gRPC port
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == DEFAULT_PORT
        assert c[probe]["grpc"].get("service", "") == ""  # the overall health
    args = flags(c.get("args", []))
    assert int(args.get("--port", DEFAULT_PORT)) == DEFAULT_PORT
    assert int(args.get("--metrics-port", ORCHESTRATOR_METRICS_PORT)) == ORCHESTRATOR_METRICS_PORT
    service = one(docs, "Service", "squire-orchestrator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_worker_ports_are_the_service_defaults(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    c = container(docs, "squire-worker")
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": WORKER_METRICS_PORT}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_number(c, c[probe]["httpGet"]["port"]) == WORKER_METRICS_PORT
    args = flags(c.get("args", []))
    assert int(args.get("--metrics-port", WORKER_METRICS_PORT)) == WORKER_METRICS_PORT
    service = one(docs, "Service", "squire-worker")
    assert [p["port"] for p in service["spec"]["ports"]] == [WORKER_METRICS_PORT]


@pytest.mark.parametrize(("deployment", "entry_point"), [
    ("squire-orchestrator", "squire-orchestrator"),
    ("squire-worker", "squire-worker"),
])
@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_container_flags_exist(rendered: Docs, folder: Path, deployment: str,
                               entry_point: str) -> None:
    c = container(rendered[folder], deployment)
    assert "command" not in c, "keep the image's ENTRYPOINT; pass flags as args"
    unknown = set(flags(c["args"])) - help_flags(entry_point)
    assert not unknown, f"{entry_point} --help does not know {sorted(unknown)}"


def parsed(parse: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return parse(*args, **kwargs)
    except SystemExit as exc:  # argparse prints the reason to stderr
        raise AssertionError(f"the container args do not parse: {args[0]}") from exc


def orchestrator_config(docs: list[dict[str, Any]]) -> Any:
    return parsed(parse_args, container(docs, "squire-orchestrator")["args"])


def worker_config(docs: list[dict[str, Any]]) -> Any:
    # Parsed as the container would: with the image's ENV (SQUIRE_OPS comes from
    # there, the manifests pass no --ops) and the manifest's env on top.
    c = container(docs, "squire-worker")
    environ = dockerfile_stages(DOCKERFILES["worker"])[-1].env()
    environ.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return parsed(parse_config, c["args"], environ=environ)


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_termination_grace_covers_the_drain(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    worker = one(docs, "Deployment", "squire-worker")["spec"]["template"]["spec"]
    drain = worker_config(docs).drain_grace  # the flag, or the CLI's default (30)
    assert worker["terminationGracePeriodSeconds"] >= drain, (
        "the kubelet would SIGKILL workers before running tasks finish draining"
    )
    orchestrator = one(docs, "Deployment", "squire-orchestrator")["spec"]["template"]["spec"]
    assert orchestrator["terminationGracePeriodSeconds"] >= orchestrator_config(docs).grace


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_worker_concurrency_equals_the_cpu_limit(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    c = container(docs, "squire-worker")
    assert "--concurrency" in flags(c["args"]), (
        "set --concurrency: the default (os.cpu_count()) sees the node's cores, not the limit"
    )
    assert worker_config(docs).concurrency == cpu_cores(c["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_workers_dial_the_orchestrator_service(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    host, port = worker_config(docs).orchestrator.rsplit(":", 1)
    service = one(docs, "Service", host)
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert int(port) == grpc["port"]


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_pods_run_as_the_image_user(rendered: Docs, folder: Path) -> None:
    for deployment, image in (("squire-orchestrator", "orchestrator"),
                              ("squire-worker", "worker")):
        spec = one(rendered[folder], "Deployment", deployment)["spec"]["template"]["spec"]
        uid = image_user_id(image)
        assert spec["securityContext"]["runAsUser"] == uid
        for c in containers({"spec": {"template": {"spec": spec}}}):
            assert c["securityContext"].get("runAsUser", uid) == uid


def test_the_prometheusrule_carries_alerts_yml() -> None:
    rule = yaml.safe_load(PROMETHEUSRULE.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], (
        f"{rel(PROMETHEUSRULE)} is stale: python deploy/prometheus/to_prometheusrule.py"
    )
    result = run([sys.executable, str(DEPLOY / "prometheus" / "to_prometheusrule.py"), "--check"])
    assert result.returncode == 0, result.stderr


def autoscaler_metrics(docs: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for scaled in by_kind(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            names.update(PROMQL_METRIC.findall(trigger["metadata"]["query"]))
    for hpa in by_kind(docs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "External":
                names.add(metric["external"]["metric"]["name"])
    return names


def test_overlays_cover_both_autoscalers(rendered: Docs) -> None:
    kinds = {d["kind"] for docs in rendered.values() for d in docs}
    assert {"ScaledObject", "HorizontalPodAutoscaler"} <= kinds


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_the_autoscaling_metric_is_exposed(rendered: Docs, folder: Path,
                                           services: Services) -> None:
    names = autoscaler_metrics(rendered[folder])
    if not names:
        return
    assert "squire_queue_depth_total" in names
    exposed = exposed_series(services.metrics(services.orchestrator_metrics_port))
    assert names <= exposed, f"not in the orchestrator's /metrics: {sorted(names - exposed)}"
