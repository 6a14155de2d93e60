"""Prometheus metrics of the orchestrator.

Gauges and counters are read from the Router when Prometheus scrapes (a
collector, not counters scattered through the core). The HTTP server runs in
a thread, so the collector asks the event loop for a consistent snapshot
instead of reading the core's dicts while the loop mutates them. Histograms
are observed on the loop as tasks and directives end. Label values are
bounded: operation names and outcomes, never channel or task ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator_service._core import Router
from orchestrator_service._journal_types import Store
from orchestrator_service._model import QueueKey, Stats, TaskRecord, queue_label
from squire_kernel.metrics import FamiliesCollector, HistogramChild, HistogramFamily

DEFAULT_METRICS_PORT = 9464

# name -> (Stats field, help); exported as squire_task_outcomes_total{outcome=name}
OUTCOMES = {
    "ok": ("ok", "the operation returned a value"),
    "fatal": ("fatal", "a directive failed on a fatal (Terminate) error"),
    "ignored": ("ignored", "a fatal error with the Ignore strategy skipped the element"),
    "retried": ("retried", "a transient error was retried by the worker"),
    "requeued": ("requeued", "re-queued after its worker was lost or its executor crashed"),
    "timeout": ("timeouts", "ran past its task timeout and was re-queued"),
    "returned": ("returned", "handed back unstarted by a draining worker"),
    "duplicate": ("duplicates", "a late or repeated result dropped by task id and lease"),
    "late": ("late", "a result for a directive that had already ended"),
    "cancelled": ("cancelled", "queued tasks dropped by cancel, terminate or release"),
    "poison": ("poison", "a task failed for killing its worker too often"),
    "adopted": ("adopted", "held by a reconnecting worker from its earlier stream, leased back"),
}


@dataclass(frozen=True)
class Snapshot:
    stats: Stats
    queue_depth: dict[str, int]
    in_flight: int
    workers: int
    capacity: int
    channels: int
    directives: int
    # per tenant of the tenants file: (queued, in flight, directives, completed, throttled)
    tenants: dict[str, tuple[int, int, int, int, int]]


def snapshot(router: Router) -> Snapshot:
    depth: dict[str, int] = {}
    for key, queue in router.queues.items():
        label = queue_label(key)
        depth[label] = depth.get(label, 0) + queue.depth
    s = router.stats
    return Snapshot(
        stats=Stats(**{f: getattr(s, f) for f in s.__slots__}),
        queue_depth=depth,
        in_flight=sum(len(w.leases) for w in router.workers.values()),
        workers=len(router.workers),
        capacity=sum(w.hello.capacity for w in router.workers.values()),
        channels=sum(1 for c in router.channels.values() if not c.directive),
        directives=len(router.directives),
        tenants=tenant_figures(router),
    )


def tenant_figures(router: Router) -> dict[str, tuple[int, int, int, int, int]]:
    """Only the tenants of the file are labels: their number is bounded."""
    if not router.tenants:
        return {}
    queued = dict.fromkeys(router.tenants, 0)
    leased = dict.fromkeys(router.tenants, 0)
    directives = dict.fromkeys(router.tenants, 0)
    for channel in router.channels.values():
        if channel.tenant in queued:
            queued[channel.tenant] += channel.queued
            leased[channel.tenant] += channel.leased
            directives[channel.tenant] += channel.directive
    return {
        t: (queued[t], leased[t], directives[t], router.tenant_completed.get(t, 0),
            router.tenant_throttled.get(t, 0))
        for t in router.tenants
    }


class RouterCollector(Collector):
    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop) -> None:
        self._router = router
        self._loop = loop

    def _snapshot(self) -> Snapshot:
        async def take() -> Snapshot:
            return snapshot(self._router)

        return asyncio.run_coroutine_threadsafe(take(), self._loop).result(timeout=5)

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        s = snap.stats
        yield CounterMetricFamily(
            "squire_tasks_published", "Tasks queued (client tasks and directive tasks).",
            value=s.published,
        )
        yield CounterMetricFamily(
            "squire_tasks_dispatched", "Task leases sent to workers (re-dispatches included).",
            value=s.dispatched,
        )
        outcomes = CounterMetricFamily(
            "squire_task_outcomes",
            "Task reports by outcome: " + "; ".join(f"{k}: {v[1]}" for k, v in OUTCOMES.items()),
            labels=["outcome"],
        )
        for name, (attr, _) in OUTCOMES.items():
            outcomes.add_metric([name], getattr(s, attr))
        yield outcomes
        yield CounterMetricFamily(
            "squire_worker_ipc_sent", "Worker IPC messages sent (abort, execution failed, drain).",
            value=s.ipc_sent,
        )
        yield CounterMetricFamily(
            "squire_directives_cancelled", "Directives cancelled by their client.",
            value=s.directives_cancelled,
        )
        yield GaugeMetricFamily(
            "squire_queued_tasks", "Tasks waiting for a worker.",
            value=sum(snap.queue_depth.values()),
        )
        per_op = GaugeMetricFamily(
            "squire_queue_depth", "Tasks waiting for a worker, by operation.",
            labels=["operation"],
        )
        for op, depth in sorted(snap.queue_depth.items()):
            per_op.add_metric([op], depth)
        yield per_op
        yield GaugeMetricFamily(
            "squire_tasks_in_flight", "Tasks leased to workers and not yet reported.",
            value=snap.in_flight,
        )
        yield GaugeMetricFamily(
            "squire_workers_connected", "Connected workers.", value=snap.workers
        )
        yield GaugeMetricFamily(
            "squire_connected_capacity", "Tasks the connected workers execute at once, summed.",
            value=snap.capacity,
        )
        yield GaugeMetricFamily(
            "squire_channels_active", "Channels leased through the channel API.",
            value=snap.channels,
        )
        yield GaugeMetricFamily(
            "squire_directives_active", "Directives being evaluated.", value=snap.directives
        )
        # Always declared (empty without a tenants file), so dashboards and
        # alerts can name them whatever the configuration.
        families = (
            (GaugeMetricFamily, "squire_tenant_queued_tasks", "Tasks waiting, by tenant."),
            (GaugeMetricFamily, "squire_tenant_tasks_in_flight",
             "Tasks leased to workers, by tenant (its share of the slots)."),
            (GaugeMetricFamily, "squire_tenant_directives_active",
             "Directives being evaluated, by tenant."),
            (CounterMetricFamily, "squire_tenant_tasks_completed",
             "Tasks completed, by tenant."),
            (CounterMetricFamily, "squire_tenant_throttled",
             "Times a directive's input credit was held back by the tenant's "
             "max_queued_tasks."),
        )
        for position, (kind, name, text) in enumerate(families):
            family = kind(name, text, labels=["tenant"])
            for tenant, figures in sorted(snap.tenants.items()):
                family.add_metric([tenant], figures[position])
            yield family


class JournalCollector(Collector):
    """The journal's counters, read from the store's stats at scrape time."""

    def __init__(self, store: Store, recovery_seconds: float, resumed: int) -> None:
        self._store = store
        self._recovery = recovery_seconds
        self._resumed = resumed

    def collect(self) -> Iterator[Metric]:
        stats = self._store.stats
        yield CounterMetricFamily(
            "squire_journal_commits", "Journal transactions committed (group commits).",
            value=stats.commits,
        )
        yield CounterMetricFamily(
            "squire_journal_entries", "Journal entries committed (each a batch of records).",
            value=stats.entries,
        )
        yield CounterMetricFamily(
            "squire_journal_failed_commits",
            "Journal commits that failed and were retried (disk full, read-only).",
            value=stats.failed_commits,
        )
        yield GaugeMetricFamily(
            "squire_journal_bytes", "Size of the journal on disk (database and write-ahead log).",
            value=stats.journal_bytes(),
        )
        yield GaugeMetricFamily(
            "squire_journal_failing",
            "1 while journal commits fail (new work is refused), else 0.",
            value=1 if self._store.failure is not None else 0,
        )
        yield GaugeMetricFamily(
            "squire_recovery_seconds", "How long this orchestrator's start took to restore "
            "its journal.", value=self._recovery,
        )
        yield GaugeMetricFamily(
            "squire_directives_resumed", "Directives restored from the journal at start.",
            value=self._resumed,
        )


class OrchestratorMetrics:
    """Registers the collector and histograms; ``serve(port)`` exposes /metrics."""

    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RouterCollector(router, loop))
        # Observed once per task: a lock-free family (see squire_kernel.metrics).
        self.task_latency = HistogramFamily(
            "squire_task_latency_seconds",
            "Task end-to-end latency, published to result, by operation.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60, 300),
        )
        # Observed once per directive: on a small directive's latency path.
        self.directive_duration = HistogramFamily(
            "squire_directive_duration_seconds",
            "Directive duration from start to end, by outcome (done, failed, cancelled).",
            ["outcome"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
        )
        self.registry.register(FamiliesCollector([self.task_latency, self.directive_duration]))
        self._latency_children: dict[tuple[int, str], HistogramChild] = {}
        self._server: object | None = None

    def tasks_done(self, tasks: list[TaskRecord], now: float) -> None:
        # Per batch of results, not per task: the tasks of a batch mostly
        # share their queue and were published together (one input
        # message), so each run of equal (queue, published_at) is one
        # observe with a count.
        child: HistogramChild | None = None
        operation: str | None = None
        kind = -1
        published = -1.0
        run = 0
        for task in tasks:
            if task.operation is not operation or task.kind != kind:
                if run:
                    assert child is not None
                    child.observe(now - published, run)
                    run = 0
                operation, kind = task.operation, task.kind
                child = self._child((kind, operation))
            if task.published_at != published:
                if run:
                    assert child is not None
                    child.observe(now - published, run)
                    run = 0
                published = task.published_at
            run += 1
        if run:
            assert child is not None
            child.observe(now - published, run)

    def _child(self, key: QueueKey) -> HistogramChild:
        # A per-queue cache: labels() hashes its label values every time.
        child = self._latency_children.get(key)
        if child is None:
            child = self._latency_children[key] = self.task_latency.labels(queue_label(key))
        return child

    def watch_journal(self, store: Store, recovery_seconds: float, resumed: int) -> None:
        """Export the journal's figures; commit latency and batch size are
        observed on the store's writer thread (its only writer)."""
        self.registry.register(JournalCollector(store, recovery_seconds, resumed))
        latency = HistogramFamily(
            "squire_journal_commit_seconds", "Journal commit latency (one group commit).", [],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 1),
        )
        size = HistogramFamily(
            "squire_journal_commit_entries", "Entries per journal commit (the group size).", [],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
        )
        self.registry.register(FamiliesCollector([latency, size]))
        latency_child, size_child = latency.labels(), size.labels()

        def observe(seconds: float, writes: int, entries: int, nbytes: int) -> None:
            latency_child.observe(seconds)
            size_child.observe(entries)

        store.stats.observers.append(observe)

    def directive_ended(self, outcome: str, seconds: float) -> None:
        self.directive_duration.labels(outcome).observe(seconds)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server

    def close(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None


