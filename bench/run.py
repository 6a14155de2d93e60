"""Squire's benchmark suite: ``python bench/run.py`` (``--smoke`` for CI).

Starts its own orchestrator and workers on 127.0.0.1 (the embedded mode:
real processes, the same code paths as a deployment), runs W1-W6, prints a
table of medians and spreads over repeats, and writes JSON to
``bench/results/latest.json``. Timing figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p
)

import grpc  # noqa: E402
import squire  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from squire import IndexedStream  # noqa: E402
from squire.api.v1 import squire_pb2 as pb  # noqa: E402
from squire.api.v1 import squire_pb2_grpc as pb_grpc  # noqa: E402

from squire_kernel import loop as _loop  # noqa: E402

# Trivial operations: each worker's credit window must hold several batches,
# or every worker idles while its one batch of results travels back (with
# 256, W1 ran stop-and-go at ~70k tasks/s; with 1024, ~95k).
PREFETCH = 1024


@dataclass
class Sizes:
    w1: int = 20_000
    w2: int = 10_000
    w3: int = 1_000
    w5: int = 1_000_000
    w6_directives: int = 10
    w6_tasks: int = 2_000
    repeats: int = 3
    c1: int = 10_000
    c1_ms: float = 2.0
    # W1 and W4 (same size as W1) make a ratio: more repeats steady it.
    ratio_repeats: int = 5


SMOKE = Sizes(w1=2_000, w2=1_000, w3=50, w5=20_000, w6_directives=4, w6_tasks=200,
              repeats=1, ratio_repeats=1, c1=200)


@dataclass
class Result:
    name: str
    what: str
    unit: str
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        if len(self.samples) < 2:
            return "-"
        return f"{min(self.samples):,.3g} .. {max(self.samples):,.3g}"


def vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cluster(executor: str = "inline", **kwargs: Any) -> Any:
    return squire.embedded(2, ops=("bench_ops",), executor=executor, concurrency=1,
                           prefetch=PREFETCH, log=os.devnull, **kwargs)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    value = fn()
    return time.perf_counter() - t, value


def w1_once(client: squire.Client, n: int) -> float:
    dt, out = timed(lambda: IndexedStream.from_iterable(range(n)).map("noop").run(client))
    assert out == list(range(n))
    return n / dt


def w1_w4(client: squire.Client, n: int, repeats: int, batch: int) -> tuple[Result, Result]:
    """W1 and W4 in alternation, both set up throughout: they make a ratio,
    so a slow spell of this shared machine should hit both alike. Each gets
    one untimed warm-up run of full size first."""
    w1 = Result("W1", f"no-op map, {n:,} tasks, 2 workers, gathered by the client", "tasks/s")
    w4 = Result("W4", f"bare gRPC relay ceiling, {n:,} items, 2 echo workers", "items/s")
    with relay_setup(n, batch) as relay_once:
        for i in range(repeats + 1):
            one, four = w1_once(client, n), relay_once()
            if i:
                w1.samples.append(one)
                w4.samples.append(four)
    w1.extra["fraction_of_relay_ceiling"] = w1.median / w4.median
    return w1, w4


def w2(client: squire.Client, n: int, repeats: int) -> Result:
    r = Result("W2", f"inc over {n:,} inputs, then a sum fold", "s")
    for _ in range(repeats):
        dt, out = timed(
            lambda: IndexedStream.from_iterable(range(n)).map("inc").fold("add").run(client)
        )
        assert out == n * (n + 1) // 2
        r.samples.append(dt)
    return r


def w3(client: squire.Client, n: int, repeats: int) -> Result:
    """Samples are each repeat's p50; p99 is the median of the repeats' p99s."""
    r = Result("W3", f"{n:,} sequential one-element directives", "ms p50")
    p99s = []
    for _ in range(repeats):
        lat = []
        for i in range(n):
            start = time.perf_counter()
            out = IndexedStream.from_iterable([i]).map("noop").run(client)
            lat.append((time.perf_counter() - start) * 1e3)
            assert out == [i]
        lat.sort()
        r.samples.append(lat[len(lat) // 2])
        p99s.append(lat[min(len(lat) - 1, int(len(lat) * 0.99))])
    r.extra = {"p50_ms": r.median, "p99_ms": statistics.median(p99s), "p99s_ms": p99s}
    return r


@contextlib.contextmanager
def relay_setup(n: int, batch: int) -> Iterator[Callable[[], float]]:
    """The bare relay (same topology and message shapes, none of the logic)
    and its echo workers; yields a function that streams ``n`` items through
    them and returns items/s."""
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        relay = subprocess.Popen([sys.executable, str(BENCH / "relay.py"), "relay",
                                  "--port-file", str(port_file)])
        echoes: list[subprocess.Popen[bytes]] = []
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists():
                if time.monotonic() > deadline or relay.poll() is not None:
                    raise RuntimeError("the relay did not start")
                time.sleep(0.02)
            target = f"127.0.0.1:{port_file.read_text()}"
            echoes = [subprocess.Popen([sys.executable, str(BENCH / "relay.py"), "echo",
                                        "--target", target]) for _ in range(2)]
            with grpc.insecure_channel(target) as channel:
                stub = pb_grpc.DirectiveServiceStub(channel)

                def requests() -> Any:
                    yield pb.DirectiveRequest(plan=pb.Plan())
                    for lo in range(0, n, batch):
                        items = [b"%d" % i for i in range(lo, min(n, lo + batch))]
                        yield pb.DirectiveRequest(inputs=pb.InputBatch(items=items))

                def once() -> float:
                    dt, got = timed(lambda: sum(
                        len(e.items.items) for e in stub.RunDirective(requests())))
                    if got != n:
                        raise RuntimeError(f"the relay returned {got} of {n} items")
                    return n / dt

                deadline = time.monotonic() + 20
                while True:  # until both echo workers are connected
                    try:
                        once()
                        break
                    except (grpc.RpcError, RuntimeError):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the echo workers did not connect") from None
                        time.sleep(0.1)
                yield once
        finally:
            for p in (*echoes, relay):
                p.kill()
                p.wait()


def w5(n: int) -> Result:
    r = Result("W5", f"{n:,}-element map streamed from the client", "tasks/s")
    with cluster() as e:
        pid = e.orchestrator_pid
        before = vm(pid, "VmRSS")
        peak = [before]
        stop = threading.Event()

        def sample() -> None:  # VmHWM is the kernel's own peak; sampling adds a timeline
            while not stop.wait(0.2):
                peak.append(vm(pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        count = 0

        def consume() -> None:
            nonlocal count
            for _index, _value in IndexedStream.from_iterable(range(n), total=n).map("noop").iter(
                e.client
            ):
                count += 1

        dt, _ = timed(consume)
        stop.set()
        sampler.join()
        assert count == n
        r.samples.append(n / dt)
        r.extra = {
            "rss_before_mb": before / 1024,
            "peak_rss_mb": vm(pid, "VmHWM") / 1024,
            "seconds": dt,
        }
    return r


def _w6_round(client: squire.Client, directives: int, tasks: int) -> list[float]:
    """Start ``directives`` map directives at once; their completion times."""
    done = [0.0] * directives
    barrier = threading.Barrier(directives + 1)
    t0 = [0.0]

    def one(k: int) -> None:
        barrier.wait()
        out = IndexedStream.from_iterable(range(tasks)).map("noop").run(client)
        assert out == list(range(tasks))
        done[k] = time.perf_counter() - t0[0]

    threads = [threading.Thread(target=one, args=(k,)) for k in range(directives)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return done


def w6(client: squire.Client, directives: int, tasks: int, repeats: int) -> Result:
    r = Result("W6", f"{directives} concurrent directives x {tasks:,} tasks", "tasks/s")
    ratios = []
    for _ in range(repeats):
        done = _w6_round(client, directives, tasks)
        r.samples.append(directives * tasks / max(done))
        ratios.append(max(done) / statistics.median(done))
    r.extra = {"slowest_vs_median": max(ratios), "ratios": ratios}
    return r


def w3_once(client: squire.Client, n: int) -> tuple[float, float]:
    """p50 and p99 in ms of ``n`` sequential one-element directives."""
    lat = []
    for i in range(n):
        start = time.perf_counter()
        out = IndexedStream.from_iterable([i]).map("noop").run(client)
        lat.append((time.perf_counter() - start) * 1e3)
        assert out == [i]
    lat.sort()
    return lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of these processes and their children, living."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick + _cpu_seconds([int(k) for k in kids])
    return total


def _cpu_split(orchestrator: int, workers: list[int]) -> dict[str, float]:
    """CPU seconds so far of the orchestrator, the workers and their children."""
    out = {"client": time.process_time(), "orchestrator": _cpu_seconds([orchestrator]) -
           _cpu_seconds(_children(orchestrator))}
    out["worker"] = sum(_cpu_seconds([w]) - _cpu_seconds(_children(w)) for w in workers)
    out["children"] = sum(_cpu_seconds(_children(w)) for w in workers)
    return out


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _machine_busy() -> float:
    """Seconds of CPU the whole machine has spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def c1_once(client: squire.Client, n: int, ms: float, pids: list[int]) -> tuple[float, float]:
    """Tasks/s, and the share of the ideal reached on the CPU left to us.

    This machine is shared: CPU other processes take during the run is CPU
    no executor could have used, so the second figure counts only what was
    left (2 cores x wall time, less the others' busy time)."""
    busy0, ours0, self0 = _machine_busy(), _cpu_seconds(pids), time.process_time()
    dt, out = timed(
        lambda: IndexedStream.from_iterable(range(n)).map("burn", ms=ms).run(client)
    )
    ours = _cpu_seconds(pids) - ours0 + time.process_time() - self0
    others = max(0.0, _machine_busy() - busy0 - ours)
    assert out == list(range(n))
    left = 2 * dt - others
    return n / dt, (n * ms / 1000) / left


def compare_executors(executors: list[str], sizes: Sizes, rounds: int,
                      want: Callable[[str], bool]) -> list[Result]:
    """W1, W3 and C1 for each executor, in alternating rounds within one sitting.

    Every executor's cluster (2 workers x concurrency 1, prefetch 1024) is up
    throughout; each round runs each workload once on each executor, so a
    slow spell of this shared machine lands on all of them alike."""
    results: dict[tuple[str, str], Result] = {}
    p99s: dict[str, list[float]] = {e: [] for e in executors}
    ideal = 2 * 1000 / sizes.c1_ms  # 2 workers x 1 child, each a core
    for e in executors:
        results["W1", e] = Result(f"W1 {e}", f"no-op map, {sizes.w1:,} tasks, --executor {e}",
                                  "tasks/s")
        results["W3", e] = Result(f"W3 {e}", f"{sizes.w3:,} one-element directives, {e}",
                                  "ms p50")
        results["C1", e] = Result(
            f"C1 {e}", f"{sizes.c1_ms:g} ms CPU op x {sizes.c1:,}, 2 workers x 1, {e}", "tasks/s")
    with contextlib.ExitStack() as stack:
        clusters = {e: stack.enter_context(cluster(e)) for e in executors}
        clients = {e: c.client for e, c in clusters.items()}
        pids = {e: [c.orchestrator_pid, *c.worker_pids] for e, c in clusters.items()}
        of_left: dict[str, list[float]] = {e: [] for e in executors}
        cpu: dict[str, dict[str, list[float]]] = {e: {} for e in executors}
        for client in clients.values():  # warm up: spawn, estimates, connections
            IndexedStream.from_iterable(range(2_000)).map("noop").run(client)
            IndexedStream.from_iterable(range(20)).map("burn", ms=sizes.c1_ms).run(client)
        for _ in range(rounds):
            for e, client in clients.items():
                if want("W1"):
                    before = _cpu_split(pids[e][0], pids[e][1:])
                    results["W1", e].samples.append(w1_once(client, sizes.w1))
                    after = _cpu_split(pids[e][0], pids[e][1:])
                    for k in after:
                        cpu[e].setdefault(k, []).append((after[k] - before[k]) / sizes.w1 * 1e6)
                if want("W3"):
                    p50, p99 = w3_once(client, sizes.w3)
                    results["W3", e].samples.append(p50)
                    p99s[e].append(p99)
                if want("C1"):
                    rate, left = c1_once(client, sizes.c1, sizes.c1_ms, pids[e])
                    results["C1", e].samples.append(rate)
                    of_left[e].append(left)
    out = [r for r in results.values() if r.samples]
    inline = results.get(("W1", "inline"))
    inline_w3 = results.get(("W3", "inline"))
    for (workload, e), r in results.items():
        if not r.samples:
            continue
        if workload == "W1":
            for k, v in cpu[e].items():  # CPU µs per task, all workers (or children) together
                r.extra[f"cpu_us_{k}"] = statistics.median(v)
        if workload == "W1" and inline is not None and inline.samples:
            r.extra["of_inline"] = r.median / inline.median
        if workload == "W3":
            r.extra["p99_ms"] = statistics.median(p99s[e])
            if inline_w3 is not None and inline_w3.samples:
                r.extra["p50_minus_inline_ms"] = r.median - inline_w3.median
        if workload == "C1":
            r.extra["of_ideal"] = r.median / ideal
            r.extra["of_cpu_left"] = statistics.median(of_left[e])
            r.extra["of_cpu_left_all"] = of_left[e]
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "event_loop": _loop.resolve(os.environ.get("SQUIRE_EVENT_LOOP", "auto")),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for CI")
    p.add_argument("--only", default="", help="comma-separated subset, e.g. W1,W4")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "latest.json")
    p.add_argument("--executor", default="",
                   help="compare executors instead, e.g. process,thread,inline: W1, W3 and C1 "
                        "(a CPU-bound operation) for each, in alternating rounds")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the executor comparison")
    args = p.parse_args()
    sizes = SMOKE if args.smoke else Sizes()
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}

    def want(workload: str) -> bool:
        return not only or workload in only

    console = Console(width=150)
    results: list[Result] = []
    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    if executors:
        results = compare_executors(executors, sizes, 1 if args.smoke else args.rounds, want)
        report(console, results, args.smoke, args.out)
        return
    with cluster() as e:
        client = e.client
        IndexedStream.from_iterable(range(100)).map("noop").run(client)  # warm up
        if want("W1") or want("W4"):
            w1, w4 = w1_w4(client, sizes.w1, sizes.ratio_repeats, batch=256)
            results += [r for r in (w1, w4) if want(r.name)]
        if want("W2"):
            results.append(w2(client, sizes.w2, sizes.repeats))
        if want("W3"):
            results.append(w3(client, sizes.w3, sizes.repeats))
        if want("W6"):
            results.append(w6(client, sizes.w6_directives, sizes.w6_tasks, sizes.repeats))
    if want("W5"):
        results.append(w5(sizes.w5))
    report(console, sorted(results, key=lambda r: r.name), args.smoke, args.out)


def report(console: Console, results: list[Result], smoke: bool, out: Path) -> None:
    table = Table(title=f"Squire benchmark ({'smoke' if smoke else 'full'})")
    for col in ("", "workload", "median", "unit", "spread (min .. max)", "more"):
        table.add_column(col)
    for r in results:
        more = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.extra.items() if not isinstance(v, list))
        table.add_row(r.name, r.what, f"{r.median:,.3g}", r.unit, r.spread, more)
    console.print(table)
    info = machine()
    console.print(f"machine: {info}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "smoke": smoke,
                               "results": [asdict(r) | {"median": r.median}
                                           for r in results]}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
