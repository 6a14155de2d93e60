"""The kustomizations render, and what they render is valid Kubernetes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from .support import (
    CUSTOM_KINDS,
    K8S,
    WORKLOAD_KINDS,
    by_kind,
    components,
    containers,
    kustomizations,
    one,
    rel,
    selects,
)

# The oldest Kubernetes the manifests support (deploy/README.md says so) and
# the newest one kubernetes-validate ships schemas for.
KUBERNETES_VERSIONS = ("1.30.0", kv.latest_version())
DIRS = kustomizations()
OVERLAYS = [d for d in DIRS if "overlays" in d.parts]
HA = {K8S / "overlays" / "example-ha"}  # two orchestrator replicas on Postgres

Docs = dict[Path, list[dict[str, Any]]]


def test_there_are_a_base_and_overlays() -> None:
    assert K8S / "base" in DIRS
    assert K8S / "overlays" / "example" in OVERLAYS
    assert len(OVERLAYS) >= 2


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_renders(rendered: Docs, folder: Path) -> None:
    kinds = {d["kind"] for d in rendered[folder]}
    assert {"Deployment", "Service"} <= kinds


def test_every_component_is_rendered_by_an_overlay() -> None:
    used = set()
    for overlay in OVERLAYS:
        for entry in yaml.safe_load((overlay / "kustomization.yaml").read_text()).get(
            "components", []
        ):
            used.add((overlay / entry).resolve())
    unused = [rel(c) for c in components() if c.resolve() not in used]
    assert not unused, f"components no overlay renders (so no test checks them): {unused}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_core_objects_match_kubernetes_schemas(rendered: Docs, folder: Path,
                                               version: str) -> None:
    errors = []
    for doc in rendered[folder]:
        what = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{what}: {exc.message} (a new CRD kind? add it to CUSTOM_KINDS "
                          "and test its fields)")
        except kv.ValidationError as exc:
            errors.append(f"{what}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_custom_resources(rendered: Docs, folder: Path) -> None:
    """CRD objects have no schema here: check the fields they cannot work without."""
    docs = rendered[folder]
    workloads = {d["metadata"]["name"] for d in by_kind(docs, "Deployment")}
    services = by_kind(docs, "Service")
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key not in CUSTOM_KINDS:
            continue
        assert doc["metadata"]["name"]
        spec = doc["spec"]
        if doc["kind"] == "ScaledObject":
            assert spec["scaleTargetRef"]["name"] in workloads
            assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
            assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
            assert spec["triggers"], "a ScaledObject needs triggers"
            for trigger in spec["triggers"]:
                assert trigger["type"] == "prometheus"
                meta = trigger["metadata"]
                assert meta["serverAddress"].startswith("http")
                assert "squire_queued_tasks" in meta["query"]
                # KEDA wants the threshold as a string
                assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0
        elif doc["kind"] == "ServiceMonitor":
            selector = spec["selector"]["matchLabels"]
            matches = [s for s in services if selects(selector, s["metadata"]["labels"])]
            assert len(matches) == 1, f"ServiceMonitor {doc['metadata']['name']} selects {matches}"
            port_names = {p["name"] for p in matches[0]["spec"]["ports"]}
            assert spec["endpoints"]
            for endpoint in spec["endpoints"]:
                assert endpoint["port"] in port_names
                assert endpoint.get("path", "/metrics") == "/metrics"
        elif doc["kind"] == "PrometheusRule":
            groups = spec["groups"]
            assert groups and all(g["name"] and g["rules"] for g in groups)
            for rule in (r for g in groups for r in g["rules"]):
                assert rule.get("alert") or rule.get("record")
                assert rule["expr"]


@pytest.mark.parametrize("folder", OVERLAYS, ids=rel)
def test_overlay_puts_everything_in_one_namespace(rendered: Docs, folder: Path) -> None:
    namespaced = [d for d in rendered[folder] if d["kind"] != "Namespace"]
    spaces = {d["metadata"].get("namespace") for d in namespaced}
    assert len(spaces) == 1 and None not in spaces, (
        f"{rel(folder)}: objects spread over namespaces {spaces}; "
        "set `namespace:` in the overlay (it does not reach objects from components "
        "added by an overlay that builds on another)"
    )


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_orchestrator_is_a_single_replica_recreated(rendered: Docs, folder: Path) -> None:
    """One replica on its SQLite journal (Recreate: one writer), or, in the
    HA overlay, two on Postgres rolled new-first (the new one stands by, the
    old leader resigns)."""
    orchestrator = one(rendered[folder], "Deployment", "squire-orchestrator")
    args = containers(orchestrator)[0]["args"]
    if folder in HA:
        assert orchestrator["spec"]["replicas"] == 2
        strategy = orchestrator["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        assert any(a.startswith("--store=postgresql://") for a in args)
        assert not by_kind(rendered[folder], "PersistentVolumeClaim")
    else:
        assert orchestrator["spec"]["replicas"] == 1
        assert orchestrator["spec"]["strategy"]["type"] == "Recreate"
        assert not any(a.startswith("--store=postgresql") for a in args)
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for scaler in by_kind(rendered[folder], kind):
            assert scaler["spec"]["scaleTargetRef"]["name"] != "squire-orchestrator"


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_an_autoscaler_owns_the_worker_replicas(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    scalers = by_kind(docs, "HorizontalPodAutoscaler") + by_kind(docs, "ScaledObject")
    worker = one(docs, "Deployment", "squire-worker")
    assert len(scalers) <= 1, "KEDA and an HPA would fight over the worker replicas"
    if scalers:
        assert scalers[0]["spec"]["scaleTargetRef"]["name"] == "squire-worker"
        assert "replicas" not in worker["spec"], (
            "with an autoscaler the Deployment must not pin replicas: every apply resets them"
        )
    else:
        assert worker["spec"]["replicas"] >= 1


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_selectors_match(rendered: Docs, folder: Path) -> None:
    docs = rendered[folder]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
            for d in docs if d["kind"] in WORKLOAD_KINDS}
    for workload in (d for d in docs if d["kind"] in WORKLOAD_KINDS):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selects(selector, pods[workload["metadata"]["name"]])
    for service in by_kind(docs, "Service"):
        matched = [n for n, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        assert matched == [service["metadata"]["name"]], (
            f"Service {service['metadata']['name']} selects pods of {matched}"
        )
        workload = one(docs, "Deployment", matched[0])
        named = {p["name"] for c in containers(workload) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in named
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        matched = [n for n, labels in pods.items()
                   if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        # the orchestrator's only where it has replicas to spare
        assert matched == [pdb["metadata"]["name"]]
        assert matched == ["squire-worker"] or folder in HA


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_security_context_everywhere(rendered: Docs, folder: Path) -> None:
    for workload in (d for d in rendered[folder] if d["kind"] in WORKLOAD_KINDS):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        pod_sc = pod["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] > 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        mounts_by_volume = {v["name"]: v for v in pod.get("volumes", [])}
        for container in containers(workload):
            where = f"{name}/{container['name']}"
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", pod_sc["runAsUser"]) > 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            # a read-only root needs a writable /tmp (the process pool's temp dir)
            tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{where}: no volume at /tmp"
            assert "emptyDir" in mounts_by_volume[tmp[0]["name"]], where
            limits = container["resources"]["limits"]
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= limits.keys() and {"cpu", "memory"} <= requests.keys()
            assert "livenessProbe" in container and "readinessProbe" in container, where
