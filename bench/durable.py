"""What the journal costs and what recovery takes (issue 15):
``python bench/durable.py`` (``--smoke`` for a quick pass).

- J1: W1 (a no-op map gathered by the client, 2 inline workers) with the
  default SQLite journal against ``--store memory:``, in the same sitting,
  runs alternating between two clusters that are both up throughout; the
  ratio of medians is the journal's cost.
- J2: W5 with the journal: a 1,000,000-task no-op map streamed through
  ``iter()``; the orchestrator's RSS before, peak, after; the journal's size
  at the end and after the directive is removed and compacted.
- J3: recovery: a detached 1,000,000-task map, the orchestrator SIGKILLed once
  most of it is journaled, restarted on the journal: seconds from the restart
  to serving (GetStatus answers) and the orchestrator's own recovery figure.

Real processes on 127.0.0.1; figures are printed and written to
``bench/results/durable.json``, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
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


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


INLINE = ("--executor", "inline", "--concurrency", "1", "--prefetch", str(PREFETCH))


class Cluster:
    """An orchestrator (its own state directory, or ``store``) and two
    workers (``worker_flags``: inline by default). ``args`` go to the
    orchestrator, ``env`` to every process, and status calls carry ``token``."""

    def __init__(self, store: str | None, *, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, worker_flags: tuple[str, ...] = INLINE,
                 token: str | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="squire-bench-")
        self.dir = Path(self.tmp.name)
        self.store = store
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.port = 0
        self.log = open(self.dir / "orchestrator.log", "ab")
        self.orchestrator = self._orchestrator(0)
        self.target = f"127.0.0.1:{self.port}"
        self.workers = [
            subprocess.Popen(
                [str(BIN / "squire-worker"), "--orchestrator", self.target, "--ops", "bench_ops",
                 *worker_flags, "--metrics-port", "0", "--log-level", "WARNING"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env,
            )
            for _ in range(2)
        ]
        self.wait(lambda: self.connected() == 2, "workers")

    def connected(self) -> int:
        try:
            return len(self.status().workers)
        except grpc.RpcError:
            return 0

    def _orchestrator(self, port: int) -> subprocess.Popen[bytes]:
        port_file = self.dir / "port"
        port_file.unlink(missing_ok=True)
        store = ["--store", self.store] if self.store else ["--state-dir", str(self.dir / "state")]
        proc = subprocess.Popen(
            [str(BIN / "squire-orchestrator"), "--port", str(port), "--port-file", str(port_file),
             "--metrics-port", "0", *store, *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
        )
        self.wait(lambda: port_file.exists() and port_file.read_text(), "the port file")
        self.port = int(port_file.read_text())
        return proc

    def restart(self) -> float:
        """Start a new orchestrator on the same port and journal; seconds to serving."""
        t = time.perf_counter()
        self.orchestrator = self._orchestrator(self.port)
        self.wait(self.serving, "serving")
        return time.perf_counter() - t

    def serving(self) -> bool:
        try:
            self.status()
        except grpc.RpcError:
            return False
        return True

    def status(self) -> pb.GetStatusResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            status: pb.GetStatusResponse = pb_grpc.StatusServiceStub(channel).GetStatus(
                pb.GetStatusRequest(), timeout=5, metadata=self.metadata)
            return status

    @staticmethod
    def wait(predicate: Any, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout} s")
            time.sleep(0.02)

    def journal_bytes(self) -> int:
        state = self.dir / "state"
        return sum(p.stat().st_size for p in state.glob("journal.db*")) if state.exists() else 0

    def close(self) -> None:
        for proc in [*self.workers, self.orchestrator]:
            proc.terminate()
        for proc in [*self.workers, self.orchestrator]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.log.close()
        self.tmp.cleanup()


@contextlib.contextmanager
def cluster(store: str | None, **kwargs: Any) -> Iterator[Cluster]:
    c = Cluster(store, **kwargs)
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


def spread(samples: list[float]) -> str:
    return f"{min(samples):,.0f}-{max(samples):,.0f}"


def j1(n: int, repeats: int, postgres: str | None) -> dict[str, Any]:
    """W1 on memory, SQLite (and Postgres, given its URL): all clusters up
    throughout, one run of each per round, the order rotating per round."""
    stores: dict[str, str | None] = {"memory": "memory:", "sqlite": None}
    if postgres:
        stores["postgres"] = postgres
    samples: dict[str, list[float]] = {name: [] for name in stores}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, store in stores.items():
            c = stack.enter_context(cluster(store))
            clients[name] = stack.enter_context(squire.Client(c.target))
        names = list(stores)
        for i in range(repeats + 1):  # the first round warms every one up
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                rate = w1_once(clients[name], n)
                if i:
                    samples[name].append(rate)
    memory = statistics.median(samples["memory"])
    out: dict[str, Any] = {"tasks": n, "rounds": repeats}
    for name, values in samples.items():
        out[f"{name}_tasks_per_s"] = round(statistics.median(values))
        out[f"{name}_spread"] = spread(values)
        out[f"{name}_of_memory"] = round(statistics.median(values) / memory, 3)
    out["journal_cost_percent"] = round((1 - out["sqlite_of_memory"]) * 100, 1)
    return out


def j2(n: int) -> dict[str, Any]:
    with cluster(None) as c, squire.Client(c.target) as client:
        pid = c.orchestrator.pid
        before = rss_kib(pid)
        t = time.perf_counter()
        count = 0
        peak_journal = 0
        for _ in IndexedStream.from_iterable(range(n)).map("noop").iter(client):
            count += 1
            if count % 100_000 == 0:
                peak_journal = max(peak_journal, c.journal_bytes())
        seconds = time.perf_counter() - t
        assert count == n
        at_end = c.journal_bytes()
        return {
            "tasks": n, "seconds": round(seconds, 2), "tasks_per_s": round(n / seconds),
            "rss_before_mib": round(before / 1024, 1),
            "rss_after_mib": round(rss_kib(pid) / 1024, 1),
            "rss_peak_mib": round(rss_kib(pid, "VmHWM") / 1024, 1),
            "journal_mib_peak": round(max(peak_journal, at_end) / 2**20, 1),
            "journal_mib_at_end": round(at_end / 2**20, 1),
        }


def j2_compaction(c: Cluster, client: squire.Client, directive_id: str) -> float:
    client.cancel(directive_id)  # a finished directive is dropped with its results
    c.wait(lambda: c.journal_bytes() < 4 * 2**20, "compaction", timeout=120)
    return c.journal_bytes() / 2**20


def j3(n: int) -> dict[str, Any]:
    with cluster(None) as c, squire.Client(c.target) as client:
        directive_id = IndexedStream.from_iterable(range(n)).map("noop").submit(client)

        def mostly_done() -> bool:
            status = c.status()
            return any(d.progress.completed >= n * 0.9 for d in status.directives) or (
                not status.directives)

        c.wait(mostly_done, "90 % of the map", timeout=600)
        journal = c.journal_bytes()
        c.orchestrator.send_signal(signal.SIGKILL)
        c.orchestrator.wait()
        to_serving = c.restart()
        log = (c.dir / "orchestrator.log").read_text()
        found = re.findall(r"recovery_seconds=([0-9.]+)", log)
        t = time.perf_counter()
        done = sum(1 for e in client.attach(directive_id) if isinstance(e, squire.ItemBatch))
        read_all = time.perf_counter() - t
        after = j2_compaction(c, client, directive_id)
        return {
            "tasks": n, "journal_mib_at_kill": round(journal / 2**20, 1),
            "restart_to_serving_s": round(to_serving, 2),
            "orchestrator_recovery_s": float(found[-1]) if found else None,
            "attach_and_read_all_s": round(read_all, 2), "item_batches": done,
            "journal_mib_after_cancel_and_compaction": round(after, 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes")
    p.add_argument("--only", default="J1,J2,J3")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "durable.json")
    p.add_argument("--postgres", action="store_true",
                   help="J1 on Postgres too (a real server started for the run, as the tests do)")
    args = p.parse_args()
    only = set(args.only.split(","))
    n1, rounds, n2 = (2_000, 1, 20_000) if args.smoke else (20_000, 5, 1_000_000)
    out: dict[str, Any] = {"load": os.getloadavg()}
    if "J1" in only:
        with contextlib.ExitStack() as stack:
            url = None
            if args.postgres:
                sys.path.insert(0, str(BENCH.parent / "tests"))
                from pg import Postgres

                server = Postgres.create()
                stack.callback(server.destroy)
                os.environ.update(server.env())
                url = server.create_database("bench")
            out["J1"] = j1(n1, rounds, url)
        print("J1", json.dumps(out["J1"]), flush=True)
    if "J2" in only:
        out["J2"] = j2(n2)
        print("J2", json.dumps(out["J2"]), flush=True)
    if "J3" in only:
        out["J3"] = j3(n2)
        print("J3", json.dumps(out["J3"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
