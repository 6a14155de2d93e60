"""The manifests agree with the code: ports, flags, grace periods, capacity,
the worker's target, the image's user, and the autoscaling metric."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from orchestrator_service.__main__ import DEFAULT_PORT, parse_args
from orchestrator_service._metrics import DEFAULT_METRICS_PORT as ORCHESTRATOR_METRICS_PORT
from orchestrator_service._security import check_listen, is_loopback, security_from_args
from orchestrator_service._server import UP_SERVICE
from worker_service._cli import parse_config
from worker_service._probe import DEFAULT_METRICS_PORT as WORKER_METRICS_PORT

from .support import (
    ALERTS,
    BIN,
    DEPLOY,
    DOCKERFILES,
    K8S,
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
# Overlays allowed to run the orchestrator in plaintext (--insecure). Everything
# else, the example overlays included, must use TLS, mTLS and tokens.
INSECURE = {K8S / "overlays" / "dev-insecure"}
INSECURE_LABEL = ("squire.dev/security", "insecure")
# Flags whose value is a credential file: it must come from a Secret volume.
CREDENTIAL_FLAGS = {
    "squire-orchestrator": {"--tls-cert", "--tls-key", "--tls-client-ca",
                            "--worker-token-file", "--client-token-file"},
    "squire-worker": {"--tls-ca", "--tls-cert", "--tls-key", "--token-file"},
}


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
    config = orchestrator_config(docs)
    # the probes' port: the plaintext --health-port (no default: 0 = off), since
    # the kubelet's gRPC probes cannot speak the main port's TLS
    health_port = config.health_port
    assert health_port > 0, "set --health-port: gRPC probes cannot speak TLS"
    assert health_port not in (config.port, config.metrics_port)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": DEFAULT_PORT, "metrics": ORCHESTRATOR_METRICS_PORT,
                     "health": health_port}
    # native gRPC probes (grpc.health.v1) on the health port
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == health_port, (
            f"{probe} asks port {c[probe]['grpc']['port']}, the orchestrator serves "
            f"plaintext health on --health-port={health_port}"
        )
        # the overall health; with replicas, the process's (a standby is
        # ready too, or a rolling update could never start its new replica)
        wanted = UP_SERVICE if config.store.startswith("postgresql") else ""
        assert c[probe]["grpc"].get("service", "") == wanted
    assert config.port == DEFAULT_PORT
    assert config.metrics_port == ORCHESTRATOR_METRICS_PORT
    # the Service carries the API and /metrics; probes go to the pod directly
    service = one(docs, "Service", "squire-orchestrator")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "grpc": DEFAULT_PORT, "metrics": ORCHESTRATOR_METRICS_PORT}


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


def test_credential_flags_exist() -> None:
    for entry_point, names in CREDENTIAL_FLAGS.items():
        assert names <= help_flags(entry_point), entry_point


def mounted_secret_file(pod: dict[str, Any], c: dict[str, Any], path: str) -> str:
    """Why ``path`` exists in the container: a file of a read-only Secret volume
    mounted without subPath (so rotated Secrets reach it) that the non-root
    user can read; fails otherwise. Returns the Secret's name."""
    file = PurePosixPath(path)
    assert file.is_absolute(), f"{path}: give credential files as absolute paths"
    mounts = [m for m in c.get("volumeMounts", [])
              if file.is_relative_to(PurePosixPath(m["mountPath"]))]
    assert mounts, f"{path}: no volumeMount covers it (the file would not exist)"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost wins
    assert mount.get("readOnly") is True, f"{mount['mountPath']}: mount Secrets readOnly"
    assert "subPath" not in mount, f"{mount['mountPath']}: subPath mounts never see updates"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secret = volumes[mount["name"]].get("secret")
    assert secret is not None, f"{path}: volume {mount['name']} is not a Secret volume"
    assert not secret.get("optional"), f"{path}: an optional Secret hides a missing one"
    inside = str(file.relative_to(mount["mountPath"]))
    items = {i["path"]: i for i in secret.get("items", [])}
    if items:  # only the listed keys exist in the volume
        assert inside in items, (
            f"{path}: Secret {secret['secretName']} projects only {sorted(items)}"
        )
    mode = items.get(inside, {}).get("mode", secret.get("defaultMode", 0o644))
    assert mode & 0o007 == 0, f"{path}: mode {mode:o} lets any user read it"
    assert mode & 0o040, f"{path}: mode {mode:o} is unreadable for the fsGroup"
    sc = pod["securityContext"]
    assert sc.get("fsGroup") == sc["runAsGroup"], (
        "set fsGroup to the image's group, so the non-root user can read Secret files"
    )
    return str(secret["secretName"])


@pytest.mark.parametrize("deployment", list(CREDENTIAL_FLAGS))
@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_credential_files_come_from_secrets(rendered: Docs, folder: Path,
                                            deployment: str) -> None:
    docs = rendered[folder]
    pod = one(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    c = container(docs, deployment)
    args = flags(c["args"])
    for name in sorted(CREDENTIAL_FLAGS[deployment] & args.keys()):
        assert f"{name}={args[name]}" in c["args"], f"write {name}=PATH (one item)"
        mounted_secret_file(pod, c, args[name])
    if folder not in INSECURE:
        missing = CREDENTIAL_FLAGS[deployment] - args.keys()
        assert not missing, f"{deployment}: no {sorted(missing)} (TLS, mTLS and tokens)"
    # no credentials in the manifest itself
    for env in c.get("env", []):
        assert not re.search(r"TOKEN|KEY", env["name"]) or "value" not in env, env["name"]


def parsed(parse: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return parse(*args, **kwargs)
    except SystemExit as exc:  # argparse prints the reason to stderr
        raise AssertionError(f"the container args do not parse: {args[0]}") from exc


def orchestrator_config(docs: list[dict[str, Any]]) -> Any:
    return parsed(parse_args, container(docs, "squire-orchestrator")["args"])


def with_stand_ins(entry_point: str, args: list[str], where: Path) -> list[str]:
    """``args`` with each credential file (a Secret in the pod, absent here)
    replaced by a stand-in under ``where``, for parsers that read the files."""
    out = []
    for arg in args:
        name, _, value = arg.partition("=")
        if name in CREDENTIAL_FLAGS[entry_point] and value:
            stand_in = where / name.lstrip("-") / PurePosixPath(value).name
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text(
                f"{name}-{secrets.token_hex(16)}\n" if "token" in name
                else "-----BEGIN STAND-IN-----\n-----END STAND-IN-----\n"
            )
            arg = f"{name}={stand_in}"
        out.append(arg)
    return out


def worker_config(docs: list[dict[str, Any]], files: Path) -> Any:
    # Parsed as the container would: with the image's ENV (SQUIRE_OPS comes from
    # there, the manifests pass no --ops) and the manifest's env on top. The
    # parser reads the credential files: stand-ins in ``files`` take their place.
    c = container(docs, "squire-worker")
    environ = dockerfile_stages(DOCKERFILES["worker"])[-1].env()
    environ.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return parsed(parse_config, with_stand_ins("squire-worker", c["args"], files),
                  environ=environ)


@pytest.fixture
def image_environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """os.environ as in the orchestrator's container: no SQUIRE_* of this
    machine, the image's ENV instead (SQUIRE_HOST=0.0.0.0)."""
    for key in [k for k in os.environ if k.startswith("SQUIRE_")]:
        monkeypatch.delenv(key)
    image = {k: v for k, v in dockerfile_stages(DOCKERFILES["orchestrator"])[-1].env().items()
             if k.startswith("SQUIRE_")}
    for key, value in image.items():
        monkeypatch.setenv(key, value)
    return image


def startup_security(args: Any, tmp_path: Path) -> Any:
    """The SecurityConfig the orchestrator would build from ``args`` at start-up.
    The token files and the tenants file are Secrets that do not exist here:
    valid stand-ins (distinct per role) take their place; the other paths
    are not read."""
    for attr in ("worker_token_file", "client_token_file"):
        if getattr(args, attr):
            stand_in = tmp_path / attr
            stand_in.write_text(f"{attr}-{secrets.token_hex(16)}\n")
            setattr(args, attr, str(stand_in))
    if getattr(args, "tenants", None):
        stand_in = tmp_path / "tenants.toml"
        digest = hashlib.sha256(secrets.token_hex(16).encode()).hexdigest()
        stand_in.write_text(f'[tenants.team]\ntoken_sha256 = ["{digest}"]\n')
        args.tenants = str(stand_in)
    return security_from_args(args, environ={})


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_orchestrator_is_not_refused_to_listen(rendered: Docs, folder: Path,
                                               image_environ: dict[str, str],
                                               tmp_path: Path) -> None:
    # The start-up check (Orchestrator.start -> check_listen): plaintext on a
    # non-loopback address exits with code 2 unless --insecure.
    c = container(rendered[folder], "squire-orchestrator")
    for env in c.get("env", []):
        if "value" in env:
            os.environ[env["name"]] = env["value"]  # undone by image_environ's monkeypatch
    args = orchestrator_config(rendered[folder])
    assert not is_loopback(args.host), "in a pod, 127.0.0.1 is unreachable for workers"
    security = startup_security(args, tmp_path)  # SecurityConfigError: contradicting flags
    check_listen(args.host, security)  # InsecureListenError: exit code 2
    if folder in INSECURE:
        assert security.insecure and not security.tls
        labels = one(rendered[folder], "Deployment", "squire-orchestrator")["metadata"]["labels"]
        assert labels.get(INSECURE_LABEL[0]) == INSECURE_LABEL[1], "label the insecure overlay"
    else:
        assert not security.insecure, f"{rel(folder)}: only {sorted(map(rel, INSECURE))} " \
            "may use --insecure"
        assert security.tls and security.require_worker_client_cert
        assert security.worker_tokens and security.client_tokens


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_workers_speak_what_the_orchestrator_serves(rendered: Docs, folder: Path,
                                                    image_environ: dict[str, str],
                                                    tmp_path: Path) -> None:
    orchestrator = startup_security(orchestrator_config(rendered[folder]), tmp_path)
    worker = worker_config(rendered[folder], tmp_path)
    assert worker.uses_tls == orchestrator.tls
    if orchestrator.require_worker_client_cert:
        assert worker.tls_cert and worker.tls_key, "mTLS: workers need a client certificate"
        assert worker.tls_ca, "trust the CA that signed squire-orchestrator's certificate"
    if orchestrator.worker_tokens:
        assert worker.token_file, "token authentication: workers need --token-file"


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_termination_grace_covers_the_drain(rendered: Docs, folder: Path,
                                           tmp_path: Path) -> None:
    docs = rendered[folder]
    worker = one(docs, "Deployment", "squire-worker")["spec"]["template"]["spec"]
    drain = worker_config(docs, tmp_path).drain_grace  # the flag, or the CLI's default (30)
    assert worker["terminationGracePeriodSeconds"] >= drain, (
        "the kubelet would SIGKILL workers before running tasks finish draining"
    )
    orchestrator = one(docs, "Deployment", "squire-orchestrator")["spec"]["template"]["spec"]
    assert orchestrator["terminationGracePeriodSeconds"] >= orchestrator_config(docs).grace


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_worker_concurrency_equals_the_cpu_limit(rendered: Docs, folder: Path,
                                               tmp_path: Path) -> None:
    docs = rendered[folder]
    c = container(docs, "squire-worker")
    assert "--concurrency" in flags(c["args"]), (
        "set --concurrency: the default (os.cpu_count()) sees the node's cores, not the limit"
    )
    assert worker_config(docs, tmp_path).concurrency == cpu_cores(c["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("folder", DIRS, ids=rel)
def test_workers_dial_the_orchestrator_service(rendered: Docs, folder: Path,
                                              tmp_path: Path) -> None:
    docs = rendered[folder]
    target = worker_config(docs, tmp_path).orchestrator
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    service = one(docs, "Service", host)
    if target.startswith("dns:///"):  # every replica's address: a headless Service
        assert service["spec"]["clusterIP"] == "None"
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
    assert "squire_queued_tasks" in names
    exposed = exposed_series(services.metrics(services.orchestrator_metrics_port))
    assert names <= exposed, f"not in the orchestrator's /metrics: {sorted(names - exposed)}"
