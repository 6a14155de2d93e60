"""Weighted fair share between tenants, real processes (issue 17).

Tenant A floods 8 directives of 3,000 slow tasks; once A has the workers,
tenant B submits one directive of 300. B must finish before A has done a
quarter of its tasks, and B's share of the worker time while both are
active (measured from the spans each execution writes) must be within 10
points of its weight's share: one half at weights 1:1, three quarters when
B weighs 3.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from pathlib import Path

import pytest
import squire
from procs import cluster, wait_until

from .support import Figures, Ledger, start_workers

SLEEP = 0.01  # seconds per task
A_DIRECTIVES, A_TASKS, B_TASKS = 8, 3_000, 300
WORKER_TOKEN = "wt-" + secrets.token_hex(16)
TOKENS = {name: f"{name}-" + secrets.token_hex(16) for name in ("a", "b", "ops")}


def tenants_file(path: Path, weight_a: int, weight_b: int) -> Path:
    def sha(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    path.write_text(
        f'[tenants.a]\ntoken_sha256 = ["{sha(TOKENS["a"])}"]\nweight = {weight_a}\n\n'
        f'[tenants.b]\ntoken_sha256 = ["{sha(TOKENS["b"])}"]\nweight = {weight_b}\n\n'
        f'[tenants.ops]\ntoken_sha256 = ["{sha(TOKENS["ops"])}"]\nadmin = true\n'
    )
    return path


def spans(directory: Path) -> list[tuple[str, float, float]]:
    out = []
    for path in directory.glob("span-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split(" ")
            if len(parts) == 4:  # a torn last line of a killed process is skipped
                out.append((parts[0], float(parts[2]), float(parts[3])))
    return out


def timed_map(n: int, tag: str) -> squire.IndexedStream:
    return squire.IndexedStream.from_iterable(range(n)).map("fault_timed", tag=tag, sleep=SLEEP)


@pytest.mark.parametrize(("weight_a", "weight_b"), [(1, 1), (1, 3)], ids=["1-1", "1-3"])
def test_weighted_fair_share_between_tenants(
    ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures, tmp_path: Path,
    weight_a: int, weight_b: int,
) -> None:
    file = tenants_file(tmp_path / "tenants.toml", weight_a, weight_b)
    stop = threading.Event()
    with cluster(env={**env, "SQUIRE_WORKER_TOKEN": WORKER_TOKEN}, log_dir=logs,
                 orchestrator_args=("--tenants", str(file)), token=TOKENS["ops"]) as c:
        start_workers(c, ["w0", "w1"], concurrency=2, executor="thread")
        with squire.Client(c.target, token=TOKENS["a"]) as a, \
                squire.Client(c.target, token=TOKENS["b"]) as b:

            def flood(i: int) -> None:
                run = timed_map(A_TASKS, f"fairA{i}").events(a)
                try:
                    for _ in run:
                        if stop.is_set():
                            break
                finally:
                    run.cancel()

            threads = [threading.Thread(target=flood, args=(i,), daemon=True)
                       for i in range(A_DIRECTIVES)]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(spans(ledger.dir)) >= 100, 60, message="A holding the workers")
            values = timed_map(B_TASKS, "fairB").run(b)
            b_done = time.monotonic()
            stop.set()
            for thread in threads:
                thread.join(30)
    assert values == list(range(B_TASKS))
    done = spans(ledger.dir)
    a_by_then = sum(1 for tag, _, end in done if tag.startswith("fairA") and end <= b_done)
    assert a_by_then < A_DIRECTIVES * A_TASKS / 4, f"A finished {a_by_then} tasks first"
    b_spans = [(s, e) for tag, s, e in done if tag == "fairB"]
    t0, t1 = min(s for s, _ in b_spans), max(e for _, e in b_spans)
    busy = {"a": 0.0, "b": 0.0}
    for tag, s, e in done:
        overlap = min(e, t1) - max(s, t0)
        if overlap > 0:
            busy["b" if tag == "fairB" else "a"] += overlap
    share = busy["b"] / (busy["a"] + busy["b"])
    expected = weight_b / (weight_a + weight_b)
    assert abs(share - expected) <= 0.10, f"B's share {share:.3f}, its weight's {expected:.3f}"
    scenario = f"fair share, weights A:B = {weight_a}:{weight_b}"
    figures.add(scenario, "B's share of worker time while both ran",
                f"{share:.3f} (target {expected:.2f} ± 0.10)")
    figures.add(scenario, "A's tasks done when B finished", f"{a_by_then:,} of "
                f"{A_DIRECTIVES * A_TASKS:,}")
