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

import squire  # noqa: E402
from durable import INLINE, Cluster, cluster, spread, w1_once  # noqa: E402
from squire import IndexedStream  # noqa: E402

WORKER_TOKEN = "wt-" + secrets.token_hex(16)


@contextlib.contextmanager
def tenants_cluster(tenants: dict[str, int] | None = None,
                    worker_flags: tuple[str, ...] = INLINE,
                    ) -> Iterator[tuple[Cluster, dict[str, str]]]:
    """A memory-store cluster and its tokens by tenant. With ``tenants``
    (name -> weight): a tenants file with one token per tenant and an
    operator's, and the workers carry a worker token; without, no tokens."""
    if not tenants:
        with cluster("memory:", worker_flags=worker_flags) as c:
            yield c, {}
        return
    tokens = {name: f"{name}-" + secrets.token_hex(16) for name in [*tenants, "ops"]}
    with tempfile.TemporaryDirectory(prefix="squire-bench-tenants-") as directory:
        file = Path(directory) / "tenants.toml"
        file.write_text("".join(
            f'[tenants.{name}]\ntoken_sha256 = ["{_sha(token)}"]\n'
            + ("admin = true\n\n" if name == "ops" else f"weight = {tenants[name]}\n\n")
            for name, token in tokens.items()
        ))
        with cluster("memory:", args=("--tenants", str(file)),
                     env={"SQUIRE_WORKER_TOKEN": WORKER_TOKEN}, worker_flags=worker_flags,
                     token=tokens["ops"]) as c:
            yield c, tokens


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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



def t1(n: int, directives: int, tasks: int, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {k: [] for k in ("w1_plain", "w1_tenants",
                                                       "w6_plain", "w6_tenants")}
    with tenants_cluster() as (plain, _), tenants_cluster({"team": 1}) as (tenants, tokens), \
            squire.Client(plain.target) as a, \
            squire.Client(tenants.target, token=tokens["team"]) as b:
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
    with tenants_cluster(weights, worker_flags=flags) as (c, tokens):
        clients = {t: squire.Client(c.target, token=tokens[t]) for t in weights}
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
