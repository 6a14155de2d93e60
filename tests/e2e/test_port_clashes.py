"""A port another process holds: each entry point says in one line which port
and which flag, and exits 2; a worker left on its default metrics port moves
to the next free one, so several run on one machine without flags."""

from __future__ import annotations

import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest

CLEAN_EXIT = 2


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port held by a listening socket on every address."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def assert_one_line_naming(out: subprocess.CompletedProcess[str], port: int, flag: str) -> None:
    assert out.returncode == CLEAN_EXIT, out.stderr
    # the whole output: no notice logged before the start failed either
    errors = out.stderr.splitlines()
    assert len(errors) == 1 and "ERROR" in errors[0], out.stderr
    assert f"port {port} is already in use" in errors[0], out.stderr
    assert f"choose another port with {flag} (or SQUIRE_" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and "add_port.cc" not in out.stderr, out.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--health-port"])
def test_orchestrator_port_clash_is_one_line(taken_port: int, flag: str) -> None:
    ports = {"--port": "0", "--metrics-port": "0", "--health-port": "0", flag: str(taken_port)}
    argv = [procs.entry_point("squire-orchestrator"), "--host", "127.0.0.1"]
    out = run(argv + [item for pair in ports.items() for item in pair])
    assert_one_line_naming(out, taken_port, flag)


def test_worker_metrics_port_clash_is_one_line(taken_port: int) -> None:
    out = run([procs.entry_point("squire-worker"), "--ops", "squire_examples.ops",
               "--orchestrator", "127.0.0.1:1", "--metrics-port", str(taken_port)])
    assert_one_line_naming(out, taken_port, "--metrics-port")


def test_workers_on_the_default_metrics_port_move_to_a_free_one(tmp_path: Path) -> None:
    with procs.cluster(log_dir=tmp_path) as c:
        # 9465 may be held by something else on this machine: then it is taken anyway.
        holder = socket.socket()
        try:
            try:
                holder.bind(("0.0.0.0", 9465))
                holder.listen()
            except OSError:
                pass
            logs = []
            for worker_id in ("a", "b"):
                log = tmp_path / f"worker-{worker_id}.log"
                with open(log, "wb") as f:
                    c.workers[worker_id] = subprocess.Popen(
                        [procs.entry_point("squire-worker"), "--ops", "squire_examples.ops",
                         "--orchestrator", c.target, "--worker-id", worker_id,
                         "--executor", "inline"],
                        stdout=f, stderr=subprocess.STDOUT,
                    )
                logs.append(log)
            c.wait_for_workers({"a", "b"})
        finally:
            holder.close()
        ports = []
        for log in logs:
            found = procs.wait_until(
                lambda log=log: re.search(r"metrics port 9465 is taken: serving .* on (\d+)",
                                          log.read_text()),
                message=f"the fallback line in {log.name}")
            ports.append(int(found.group(1)))
        assert len(set(ports)) == 2 and all(9465 < p < 9565 for p in ports)
        for port in ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200


@pytest.mark.parametrize(("entry_point", "args", "env", "message"), [
    ("squire-orchestrator", ["--port", "99999"], {},
     "argument --port: a port is a number from 0 to 65535, not 99999"),
    ("squire-orchestrator", [], {"SQUIRE_PORT": "abc"},
     "argument --port: a port is a number from 0 to 65535, not 'abc'"),
    ("squire-orchestrator", [], {"SQUIRE_GRACE": "soon"},
     "argument --grace: invalid float value: 'soon'"),
    ("squire-worker", ["--ops", "squire_examples.ops", "--metrics-port", "70000"], {},
     "argument --metrics-port: a port is a number from 0 to 65535, not 70000"),
    ("squire-worker", ["--ops", "squire_examples.ops"], {"SQUIRE_CONCURRENCY": "many"},
     "argument --concurrency: expected a whole number, got 'many'"),
])
def test_a_bad_number_in_a_flag_or_its_variable_is_a_usage_line(
    entry_point: str, args: list[str], env: dict[str, str], message: str,
) -> None:
    """Not a traceback from bind() or from int() at start-up."""
    import os

    out = subprocess.run([procs.entry_point(entry_point), *args], capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env})
    assert out.returncode == CLEAN_EXIT, out.stderr
    assert out.stderr.splitlines()[-1] == f"{entry_point}: error: {message}", out.stderr
    assert "Traceback" not in out.stderr, out.stderr
