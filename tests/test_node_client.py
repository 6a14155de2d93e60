"""The Node.js client's own suite, run from pytest, so that the README's one
test command runs every test CI runs: its type check, unit tests, the fake
orchestrator, real services, the conformance cases and the packed package
installed into a fresh project (``clients/node/test/*.test.js``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
NEEDS = "Node.js 20+ and npm are required: see the README's first screen for how to install them"


def node_major(version: str) -> int:
    """``v20.20.2`` -> 20."""
    return int(version.strip().lstrip("v").split(".")[0])


def test_node_major() -> None:
    assert node_major("v20.20.2\n") == 20 and node_major("v18.19.1") == 18


@pytest.mark.timeout(900)
def test_the_node_client_suite_passes() -> None:
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm and node, NEEDS
    # Debian 12's and Ubuntu 24.04's own nodejs is 18: say so, rather than
    # let npm ci or a test fail in some way that does not name the cause.
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert node_major(version) >= 20, f"{node} is {version.strip()}; {NEEDS}"
    # The services the Node tests start are this interpreter's entry points.
    env = dict(os.environ, SQUIRE_BIN=str(Path(sys.executable).parent))
    for step in (
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        [npm, "test"],
    ):
        proc = subprocess.run(
            step, cwd=NODE_DIR, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=840,
        )
        assert proc.returncode == 0, f"{' '.join(step[1:])} in clients/node:\n{proc.stdout[-8000:]}"
