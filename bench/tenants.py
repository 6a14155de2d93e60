"""What tenants cost and what shares they give (issue 17):
``python bench/tenants.py`` (``--smoke`` for a quick pass).

- T1: W1 (20,000 no-op tasks) and W6 (10 concurrent directives x 2,000) on
  an orchestrator with a tenants file (the client is a tenant, the workers
  carry a worker token, so every call is authenticated and runs as its
  tenant) against one without, both clusters up throughout, runs
  alternating; the ratio of medians is what tenants cost.
- T2: W6's shape across 4 tenants of weights 1, 1, 2 and 4, each running
  one directive of 4,000 2-ms tasks at once on slot-bound workers: each
  tenant's share of the tasks completed until the first of them finished,
  against its weight's share.

Real processes on 127.0.0.1 (2 inline workers, prefetch 1024, memory store);
figures are printed and written to ``bench/results/tenants.json``, never
asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p
)

import grpc  # noqa: E402
import squire  # noqa: E402
from squire import IndexedStream  # noqa: E402
from squire.api.v1 import squire_pb2 as pb  # noqa: E402
from squire.api.v1 import squire_pb2_grpc as pb_grpc  # noqa: E402

BIN = Path(sys.executable).parent
PREFETCH = 1024
WORKER_TOKEN = "wt-" + secrets.token_hex(16)


class Cluster:
    """An orchestrator (memory store) and two inline workers; with
    ``tenants`` (name -> weight) a tenants file, one token per tenant."""

    def __init__(self, tenants: dict[str, int] | None = None, *,
                 worker_flags: tuple[str, ...] = ("--executor", "inline", "--concurrency", "1",
                                                  "--prefetch", str(PREFETCH))) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="squire-bench-")
        self.dir = Path(self.tmp.name)
        # Each tenant's token, and an operator's (to read the status).
        names = [*tenants, "ops"] if tenants else []
        self.tokens = {name: f"{name}-" + secrets.token_hex(16) for name in names}
        env = dict(os.environ)
        args = ["--store", "memory:"]
        if tenants:
            file = self.dir / "tenants.toml"
            file.write_text("".join(
                f'[tenants.{name}]\ntoken_sha256 = ["{_sha(self.tokens[name])}"]\n'
                + ("admin = true\n\n" if name == "ops" else f"weight = {tenants[name]}\n\n")
                for name in names
            ))
            args += ["--tenants", str(file)]
            env["SQUIRE_WORKER_TOKEN"] = WORKER_TOKEN
        self.admin = self.tokens.get("ops")
        port_file = self.dir / "port"
        self.orchestrator = subprocess.Popen(
            [str(BIN / "squire-orchestrator"), "--port", "0", "--port-file", str(port_file),
             "--metrics-port", "0", "--log-level", "WARNING", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        self.wait(lambda: port_file.exists() and port_file.read_text(), "the port file")
        self.target = f"127.0.0.1:{port_file.read_text()}"
        self.workers = [
            subprocess.Popen(
                [str(BIN / "squire-worker"), "--orchestrator", self.target, "--ops", "bench_ops",
                 *worker_flags, "--metrics-port", "0", "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            )
            for _ in range(2)
        ]
        self.wait(lambda: len(self.status().workers) == 2, "workers")

    def status(self) -> pb.GetStatusResponse:
        metadata = (("authorization", f"Bearer {self.admin}"),) if self.admin else ()
        with grpc.insecure_channel(self.target) as channel:
            try:
                status: pb.GetStatusResponse = pb_grpc.StatusServiceStub(channel).GetStatus(
                    pb.GetStatusRequest(), timeout=5, metadata=metadata)
            except grpc.RpcError:
                return pb.GetStatusResponse()
            return status

    @staticmethod
    def wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            time.sleep(0.02)

    def close(self) -> None:
        for proc in [*self.workers, self.orchestrator]:
            proc.terminate()
        for proc in [*self.workers, self.orchestrator]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.tmp.cleanup()


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@contextlib.contextmanager
def cluster(tenants: dict[str, int] | None = None, **kwargs: Any) -> Iterator[Cluster]:
    c = Cluster(tenants, **kwargs)
    try:
        yield c
    finally:
        c.close()


def w1_once(client: squire.Client, n: int) -> float:
    t = time.perf_counter()
    out = IndexedStream.from_iterable(range(n)).map("noop").run(client)
    dt = time.perf_counter() - t
    assert out == list(range(n))
    return n / dt


def w6_once(clients: list[squire.Client], directives: int, tasks: int) -> float:
    """``directives`` maps at once (directive k on ``clients[k % len]``); tasks/s."""
    barrier = threading.Barrier(directives + 1)

    def one(k: int) -> None:
        barrier.wait()
        out = IndexedStream.from_iterable(range(tasks)).map("noop").run(clients[k % len(clients)])
        assert out == list(range(tasks))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(directives)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return directives * tasks / (time.perf_counter() - t0)


def spread(samples: list[float]) -> str:
    return f"{min(samples):,.0f}-{max(samples):,.0f}"


def t1(n: int, directives: int, tasks: int, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {k: [] for k in ("w1_plain", "w1_tenants",
                                                       "w6_plain", "w6_tenants")}
    with cluster() as plain, cluster({"team": 1}) as tenants, \
            squire.Client(plain.target) as a, \
            squire.Client(tenants.target, token=tenants.tokens["team"]) as b:
        for i in range(rounds + 1):  # the first round warms both up
            pairs = [("plain", a), ("tenants", b)]
            if i % 2:
                pairs.reverse()
            for name, client in pairs:
                w1 = w1_once(client, n)
                w6 = w6_once([client], directives, tasks)
                if i:
                    samples[f"w1_{name}"].append(w1)
                    samples[f"w6_{name}"].append(w6)
    out: dict[str, Any] = {"w1_tasks": n, "w6": f"{directives} x {tasks}", "rounds": rounds}
    for key, values in samples.items():
        out[key] = round(statistics.median(values))
        out[f"{key}_spread"] = spread(values)
    for w in ("w1", "w6"):
        out[f"{w}_tenants_of_plain"] = round(out[f"{w}_tenants"] / out[f"{w}_plain"], 3)
    return out


def t2(tasks: int) -> dict[str, Any]:
    """Slot-bound work (2 ms naps on 2 workers x 4 threads, prefetch 4): the
    slots are what the fair share divides. (No-op tasks on W1's workers
    leave slots free: 2 x 1,025 of them outnumber what four directive
    windows keep queued, so every tenant gets what it asks for and the
    orchestrator's CPU, not the slots, sets the pace.)"""
    weights = {"t1": 1, "t2": 1, "t3": 2, "t4": 4}
    flags = ("--executor", "thread", "--concurrency", "4", "--prefetch", "4")
    with cluster(weights, worker_flags=flags) as c:
        clients = {t: squire.Client(c.target, token=c.tokens[t]) for t in weights}
        counts = dict.fromkeys(weights, 0)
        first_done = threading.Event()
        at_first: dict[str, int] = {}
        lock = threading.Lock()
        barrier = threading.Barrier(len(weights) + 1)

        def run(tenant: str) -> None:
            barrier.wait()
            stream = IndexedStream.from_iterable(range(tasks)).map("nap", ms=2.0)
            for _ in stream.iter(clients[tenant]):
                counts[tenant] += 1
            with lock:
                if not first_done.is_set():
                    at_first.update(counts)
                    first_done.set()

        threads = [threading.Thread(target=run, args=(t,)) for t in weights]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join()
        for client in clients.values():
            client.close()
    total = sum(at_first.values())
    weight_sum = sum(weights.values())
    return {
        "tasks_per_tenant": tasks,
        "weights": weights,
        "shares": {t: round(at_first[t] / total, 3) for t in weights},
        "weight_shares": {t: round(w / weight_sum, 3) for t, w in weights.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds")
    p.add_argument("--only", default="", help="T1, T2 or both (default)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "tenants.json")
    args = p.parse_args()
    n, directives, tasks, rounds, t2_tasks = (
        (2_000, 4, 200, 1, 400) if args.smoke else (20_000, 10, 2_000, 5, 4_000)
    )
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    out: dict[str, Any] = {}
    if not only or "T1" in only:
        out["T1"] = t1(n, directives, tasks, rounds)
        print("T1", json.dumps(out["T1"]), flush=True)
    if not only or "T2" in only:
        out["T2"] = t2(t2_tasks)
        print("T2", json.dumps(out["T2"]), flush=True)
    out["load_average"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
