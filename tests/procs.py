"""Real processes for end-to-end tests: the orchestrator and workers started
through their console entry points on 127.0.0.1, plus polling helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

T = TypeVar("T")
BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid} (a zombie?)")


def entry_point(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed next to {sys.executable}; pip install -e ."
    return str(path)


class Cluster:
    """An orchestrator process plus worker processes, cleaned up on close()."""

    def __init__(self, *, orchestrator_args: tuple[str, ...] = (), log_dir: Path | None = None,
                 metrics_port: int = 0, env: dict[str, str] | None = None,
                 token: str | None = None) -> None:
        # ``token``: the client token status calls carry (an operator's, with tenants).
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # Extra environment for every process of the cluster (e.g. PYTHONPATH
        # for an ops module that lives in the tests).
        self.env = dict(env or {})
        self._tmp = tempfile.TemporaryDirectory(prefix="squire-test-")
        self.dir = Path(self._tmp.name)
        self.log_dir = log_dir or self.dir
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        port_file = self.dir / "port"
        self.metrics_port = metrics_port
        self._orchestrator_args = orchestrator_args
        self.orchestrator = self._spawn(
            "orchestrator",
            [entry_point("squire-orchestrator"), "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(port_file), "--metrics-port", str(metrics_port),
             "--state-dir", str(self.dir / "state"), *orchestrator_args],
        )
        self.port = int(wait_until(lambda: port_file.exists() and port_file.read_text(),
                                   message="the orchestrator's port file"))
        self.target = f"127.0.0.1:{self.port}"
        self._channel = grpc.insecure_channel(self.target)
        self._status = pb_grpc.StatusServiceStub(self._channel)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own fd
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_worker(self, worker_id: str, *, ops: str = "squire_examples.ops",
                     concurrency: int = 1, executor: str = "process",
                     extra: tuple[str, ...] = (), wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            f"worker-{worker_id}",
            [entry_point("squire-worker"), "--orchestrator", self.target, "--ops", ops,
             "--concurrency", str(concurrency), "--executor", executor,
             "--worker-id", worker_id, "--metrics-port", "0", *extra],
        )
        self.workers[worker_id] = proc
        if wait:
            self.wait_for_workers({worker_id})
        return proc

    def kill_orchestrator(self, sig: int = signal.SIGKILL) -> None:
        self.orchestrator.send_signal(sig)
        self.orchestrator.wait(timeout=30)

    def restart_orchestrator(self, *, wait: bool = False) -> None:
        """A new orchestrator on the same port and journal (the old one is dead)."""
        assert self.orchestrator.poll() is not None, "the orchestrator is still running"
        self.orchestrator = self._spawn(
            "orchestrator",
            [entry_point("squire-orchestrator"), "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--state-dir", str(self.dir / "state"),
             *self._orchestrator_args],
        )
        if wait:
            wait_until(self.serving, 30, message="the restarted orchestrator")

    def serving(self) -> bool:
        if self.orchestrator.poll() is not None:
            raise AssertionError("the orchestrator exited: " + self.log("orchestrator"))
        try:
            self.status()
        except grpc.RpcError:
            return False
        return True

    def status(self) -> pb.GetStatusResponse:
        return self._status.GetStatus(pb.GetStatusRequest(), timeout=5,
                                      metadata=self._metadata)

    def wait_for_workers(self, ids: set[str], timeout: float = 30.0) -> None:
        def connected() -> bool:
            for proc_id in ids:
                proc = self.workers.get(proc_id)
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"worker {proc_id} exited with {proc.returncode}: "
                                         + self.log(f"worker-{proc_id}"))
            return ids <= {w.worker_id for w in self.status().workers}
        wait_until(connected, timeout, message=f"workers {sorted(ids)} to connect")

    def rss_kib(self, proc: subprocess.Popen[bytes] | None = None) -> int:
        """VmRSS of ``proc`` (default: the orchestrator) in KiB, from /proc."""
        return rss_kib((proc or self.orchestrator).pid)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def close(self) -> None:
        self._channel.close()
        procs = [*self.workers.values(), self.orchestrator]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._tmp.cleanup()


@contextlib.contextmanager
def cluster(**kwargs: object) -> Iterator[Cluster]:
    c = Cluster(**kwargs)  # type: ignore[arg-type]
    try:
        yield c
    finally:
        c.close()


class Replica:
    """One orchestrator replica on a shared store (Postgres): started by
    hand so a test can SIGKILL, SIGSTOP or SIGTERM it and start it again."""

    def __init__(self, name: str, store: str, logs: Path, *, ttl: float = 3.0,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.store = store
        self.logs = logs
        self.ttl = ttl
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [entry_point("squire-orchestrator"), "--host", "127.0.0.1", "--port",
                str(self.port), "--metrics-port", "0", "--store", self.store,
                "--lease-ttl", str(self.ttl), "--adoption-grace", "1"]
        with open(self.logs / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"})

    def health(self) -> str:
        """Its grpc.health.v1 status for service "": SERVING (the leader),
        NOT_SERVING (a standby), or DOWN."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            return "DOWN"

    def stop(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)
