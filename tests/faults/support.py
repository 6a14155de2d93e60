"""The ledger and helpers of the fault-injection suite.

The ledger counts, per (directive tag, index), two things that come from
opposite ends of the system:

- *deliveries*: results the client received (counted from the raw event
  stream, so a duplicate the SDK might hide is still seen);
- *executions*: lines the operation itself wrote (see ``fault_ops.record``).

``lost`` is the number of indices never delivered, ``duplicated`` the number
delivered more than once. Executions may exceed one per index after a fault
(a killed worker's tasks run again elsewhere); that is the price of
at-least-once execution, and the suite reports it as a figure.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import squire
from procs import Cluster
from squire import DirectiveRun, ItemBatch, Progress, Skipped

TESTS_DIR = Path(__file__).resolve().parent.parent
OPS = "faults.fault_ops"


@dataclass
class Tally:
    n: int
    deliveries: Counter[int]
    executions: Counter[int]

    @property
    def lost(self) -> list[int]:
        return [i for i in range(self.n) if self.deliveries[i] == 0]

    @property
    def duplicated(self) -> list[int]:
        return [i for i, c in self.deliveries.items() if c > 1]

    @property
    def unexpected(self) -> list[int]:
        return [i for i in self.deliveries if not 0 <= i < self.n]

    @property
    def re_executions(self) -> int:
        return sum(self.executions.values()) - len(self.executions)

    def assert_exactly_once(self) -> None:
        assert not self.unexpected, f"indices outside the input: {self.unexpected[:10]}"
        assert not self.lost, f"lost {len(self.lost)} indices, e.g. {self.lost[:10]}"
        assert not self.duplicated, (
            f"duplicated {len(self.duplicated)} indices, e.g. {self.duplicated[:10]}"
        )
        never_ran = [i for i in range(self.n) if self.executions[i] == 0]
        assert not never_ran, f"delivered but never executed: {never_ran[:10]}"


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._deliveries: dict[str, Counter[int]] = {}
        self._lock = threading.Lock()

    def deliver(self, tag: str, index: int) -> None:
        with self._lock:
            self._deliveries.setdefault(tag, Counter())[index] += 1

    def delivered(self, tag: str) -> int:
        with self._lock:
            return sum(self._deliveries.get(tag, Counter()).values())

    def executions(self, tag: str) -> Counter[int]:
        counts: Counter[int] = Counter()
        for path in self.dir.glob("exec-*.log"):
            for line in path.read_text().splitlines():
                parts = line.split(" ")
                # a process killed mid-write may leave a torn last line
                if len(parts) == 2 and parts[0] == tag and parts[1].isdigit():
                    counts[int(parts[1])] += 1
        return counts

    def tally(self, tag: str, n: int) -> Tally:
        with self._lock:
            deliveries = Counter(self._deliveries.get(tag, Counter()))
        return Tally(n, deliveries, self.executions(tag))

    # markers written by fault_ops.mark
    def marker(self, name: str) -> float | None:
        path = self.dir / name
        return float(path.read_text()) if path.exists() else None

    def markers(self, prefix: str) -> dict[str, float]:
        return {p.name: float(p.read_text()) for p in self.dir.glob(f"{prefix}*")
                if not p.name.endswith(".tmp")}


@dataclass
class MapRun:
    """What one directive's event stream delivered."""

    values: dict[int, Any] = field(default_factory=dict)
    progress: Progress | None = None
    fold: Any = None
    seconds: float = 0.0


def consume(run: DirectiveRun, ledger: Ledger, tag: str,
            on_items: Callable[[int], None] | None = None) -> MapRun:
    """Drain ``run``, counting every delivered index in the ledger.

    ``on_items(delivered_so_far)`` is called after each item batch: the
    place to inject a fault at a given point of the map.
    """
    out = MapRun()
    start = time.monotonic()
    delivered = 0
    for event in run:
        if isinstance(event, ItemBatch):
            for index, value in event.items:
                ledger.deliver(tag, index)
                out.values[index] = value
            delivered += len(event.items)
            if on_items is not None:
                on_items(delivered)
        elif isinstance(event, Progress):
            out.progress = event
        elif isinstance(event, squire.FoldValue):
            out.fold = event.value
    out.seconds = time.monotonic() - start
    return out


def square_map(n: int, tag: str, *, sleep: float = 0.0) -> squire.IndexedStream:
    stream = squire.IndexedStream.from_iterable(range(n))
    return stream.map("fault_square", tag=tag, sleep=sleep) if sleep else stream.map(
        "fault_square", tag=tag)


def assert_squares(values: dict[int, Any], n: int) -> None:
    wrong = [i for i in range(n) if values.get(i) != i * i]
    assert not wrong, f"{len(wrong)} wrong values, e.g. {[(i, values.get(i)) for i in wrong[:5]]}"


def is_skipped(value: Any) -> bool:
    return isinstance(value, Skipped)


def fault_env(directory: Path) -> dict[str, str]:
    """Environment for cluster processes: the ops module's path and ledger dir."""
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SQUIRE_FAULT_DIR": str(directory)}


def start_workers(c: Cluster, ids: Iterable[str], **kwargs: Any) -> None:
    """Start several workers at once and wait for all of them (spawning in parallel)."""
    ids = list(ids)
    kwargs.setdefault("ops", OPS)
    for worker_id in ids:
        c.start_worker(worker_id, wait=False, **kwargs)
    c.wait_for_workers(set(ids), timeout=60)


def directive_gone(c: Cluster, directive_id: str) -> bool:
    status = c.status()
    return (all(d.directive_id != directive_id for d in status.directives)
            and all(ch.channel_id != directive_id for ch in status.channels))


def queue_depth(c: Cluster, operation: str) -> int:
    return sum(q.depth for q in c.status().queues if q.operation == operation)


# ----------------------------------------------------------------- figures


class Figures:
    """Measured figures, written as JSON lines to $SQUIRE_FAULT_FIGURES if set."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, scenario: str, figure: str, value: Any) -> None:
        self.rows.append({"scenario": scenario, "figure": figure, "value": value})

    def flush(self) -> None:
        target = os.environ.get("SQUIRE_FAULT_FIGURES")
        if not target or not self.rows:
            return
        with open(target, "a") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        self.rows.clear()



# ------------------------------------------------------------ processes


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (e.g. a worker and its pool children)."""
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out.extend(process_tree(int(child)))
    return out


def scrape(port: int) -> dict[str, float]:
    """The orchestrator's /metrics as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def outcome(metrics: dict[str, float], name: str) -> int:
    return int(metrics.get(f'squire_task_outcomes_total{{outcome="{name}"}}', 0))


def stream_channel(channel: squire.ChannelHandle, ledger: Ledger, tag: str, n: int,
                   on_result: Callable[[int], None] = lambda _: None) -> dict[int, int]:
    """Tasks 0..n-1 of ``fault_square`` published on ``channel`` from a
    thread, at most 300 ahead of the results (so faults land while a Publish
    call is open), and the results received here, each delivery in the
    ledger; ``on_result(received)`` after each. Returns task id -> value."""
    values: dict[int, int] = {}
    progress = threading.Condition()
    failed: list[BaseException] = []

    def publish() -> None:
        try:
            for i in range(n):
                with progress:
                    progress.wait_for(lambda i=i: len(values) >= i - 300, timeout=120)
                channel.sender.send("fault_square", i, task_id=i,
                                    params={"tag": tag, "sleep": 0.001})
            channel.sender.close()
        except BaseException as exc:  # raised below
            failed.append(exc)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    for outcome in channel.receiver:
        assert outcome.ok, outcome.error
        ledger.deliver(tag, outcome.task_id)
        with progress:
            values[outcome.task_id] = outcome.value
            progress.notify_all()
        on_result(len(values))
    publisher.join(30)
    assert not publisher.is_alive(), "the publisher did not finish"
    if failed:
        raise failed[0]
    return values
