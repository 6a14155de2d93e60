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
NEEDS = "Node.js 20+ and npm are required (apt-get install -y nodejs npm)"


@pytest.mark.timeout(900)
def test_the_node_client_suite_passes() -> None:
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm and node, NEEDS
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
