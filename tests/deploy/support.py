"""Paths and plain helpers for the deploy checks (fixtures are in conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUSRULE = K8S / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARDS = sorted((DEPLOY / "grafana").glob("*.json"))
BIN = Path(sys.executable).parent
DOCKERFILES = {
    "orchestrator": DOCKER / "orchestrator.Dockerfile",
    "worker": DOCKER / "worker.Dockerfile",
}

# Kinds served by add-ons (CRDs): no schema in kubernetes-validate, checked by
# test_kustomize.test_custom_resources instead.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def kustomizations() -> list[Path]:
    """Every folder kubectl can build: the base and each overlay (not components)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            dirs.append(path.parent)
    return dirs


def components() -> list[Path]:
    return sorted(
        p.parent for p in K8S.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text()).get("kind") == "Component"
    )


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def find_tool(name: str, hint: str) -> str:
    """The tool next to this Python first (pip-installed), then on PATH; else fail."""
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: {hint}")
    return found


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kwargs)


# ------------------------------------------------------------------ manifests

def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def flags(args: list[str]) -> dict[str, str]:
    """``["--a=1", "--b", "2", "--c"]`` -> ``{"--a": "1", "--b": "2", "--c": ""}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected positional argument {arg!r} in {args}"
        if "=" in arg:
            name, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value = arg, args[i + 1]
            i += 1
        else:
            name, value = arg, ""
        out[name] = value
        i += 1
    return out


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port, resolving a named container port."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------ metrics

PROMQL_METRIC = re.compile(r"\bsquire_[a-zA-Z0-9_:]+")
# Series Prometheus makes itself, not the services.
SYNTHETIC = {"up"}


def exposed_series(text: str) -> set[str]:
    """Series names a /metrics text makes queryable, including histogram and
    counter series of families that have no sample yet (labelled metrics show
    only their # TYPE line until first used)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            if kind == "counter":
                base = family.removesuffix("_total")
                names.add(base + "_total")
            elif kind == "histogram":
                names.update(family + suffix for suffix in ("_bucket", "_sum", "_count"))
            elif kind == "summary":
                names.update(family + suffix for suffix in ("", "_sum", "_count"))
            else:  # gauge, untyped, info, stateset
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    # prometheus_client's *_created samples are no part of the contract
    return {n for n in names if not n.endswith("_created")}


def explain_missing(name: str, series: set[str]) -> str:
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        base = name.removesuffix(suffix)
        if base != name and any(s.startswith(base) for s in series):
            near = sorted(s for s in series if s.startswith(base))
            return f"{name}: no such series (did you mean one of {near}?)"
    return f"{name}: no such series"


def dashboard_queries(node: Any) -> Iterator[str]:
    """Every PromQL string in a Grafana dashboard: panel targets and variables."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str) and "(" in value:
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def load_dashboard(path: Path) -> Any:
    return json.loads(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's variables so promtool can parse the expression."""
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$__range", "1h").replace("$namespace", ".*"))


# ------------------------------------------------------------------ processes

def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


# ------------------------------------------------------------------ Dockerfiles

class Stage:
    """One FROM ... stage of a Dockerfile: its base image, alias and instructions."""

    def __init__(self, image: str, alias: str | None) -> None:
        self.image = image
        self.alias = alias
        self.instructions: list[tuple[str, str]] = []

    def all(self, command: str) -> list[str]:
        return [args for cmd, args in self.instructions if cmd == command]

    def env(self) -> dict[str, str]:
        """ENV values, ``KEY=value`` pairs (quotes dropped), later ones winning."""
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                if "=" in token:
                    key, value = token.split("=", 1)
                    out[key] = value
        return out


def dockerfile_stages(path: Path) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    stages: list[Stage] = []
    for line in lines:
        command, _, args = line.partition(" ")
        command = command.upper()
        if command == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], alias))
        else:
            assert stages, f"{path}: {command} before FROM"
            stages[-1].instructions.append((command, args.strip()))
    return stages


def image_user_id(name: str) -> int:
    """The numeric uid the final stage of DOCKERFILES[name] runs as."""
    user = dockerfile_stages(DOCKERFILES[name])[-1].all("USER")[-1].split(":")[0]
    assert user.isdigit(), "use a numeric USER so runAsNonRoot can verify it"
    return int(user)


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


# ------------------------------------------------------------------ live services

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n"
                + self.log.read_text(errors="replace")[-4000:]
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def spawn(name: str, argv: list[str], log_dir: Path,
          env: dict[str, str] | None = None) -> Iterator[Process]:
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    process = Process(name, proc, log)
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Services:
    """An orchestrator and one worker, started through their entry points."""

    grpc_port: int
    orchestrator_metrics_port: int
    worker_metrics_port: int
    orchestrator: Process
    worker: Process
    log_dir: Path
    health_port: int  # the orchestrator's plaintext --health-port (what the probes ask)

    def metrics(self, port: int) -> str:
        status, body = http_get(port, "/metrics")
        assert status == 200, f"GET :{port}/metrics answered {status}"
        return body

    def start_worker(self, name: str, *args: str,
                     env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Process]:
        return spawn(name, [str(BIN / "squire-worker"),
                            "--orchestrator", f"127.0.0.1:{self.grpc_port}", *args],
                     self.log_dir, env)


def wait_ready(process: Process, port: int, timeout: float = 30.0) -> None:
    def ready() -> bool:
        process.check_alive()
        return http_get(port, "/readyz")[0] == 200

    wait_until(ready, timeout, f"{process.name} to answer 200 on :{port}/readyz")
