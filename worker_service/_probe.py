"""The worker's HTTP endpoint for Kubernetes and Prometheus, on one port:

- ``/metrics``  Prometheus metrics (below)
- ``/healthz``  liveness: 200 unless the worker has closed
- ``/readyz``   readiness: 200 only while connected and not draining

Metrics (label values are operation names and outcomes, never ids):

- ``squire_worker_tasks_total{operation,outcome}`` tasks reported, by outcome
  (ok, error, bad_payload, unknown_operation, aborted, returned, crashed, timeout)
- ``squire_worker_execution_seconds{operation}`` execution time histogram
- ``squire_worker_retries_total{operation}`` transient-error retries
- ``squire_worker_busy_slots`` / ``squire_worker_capacity`` running tasks vs slots
- ``squire_worker_reconnects_total`` streams re-opened after a break
- ``squire_worker_ready`` 1 while ready

The HTTP server runs in a daemon thread; it reads plain attributes of the
runtime (ints and an enum), which is safe without the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from squire_kernel.metrics import (
    CounterChild,
    CounterFamily,
    FamiliesCollector,
    HistogramChild,
    HistogramFamily,
)
from worker_service._model import ErrorKind
from worker_service._scheduler_events import Report

DEFAULT_METRICS_PORT = 9465
COMBINE = 1

EXECUTION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300)
# Every execution up to this long lands in the histogram's first bucket, so
# a batch of such tasks can be observed in one call, as their mean.
FIRST_EXECUTION_BUCKET = EXECUTION_BUCKETS[0]

_OUTCOME = {kind: kind.name.lower() for kind in ErrorKind}
_OUTCOME[ErrorKind.OPERATION] = "error"


class WorkerMetrics:
    def __init__(
        self,
        *,
        capacity: int,
        busy: Callable[[], int],
        ready: Callable[[], bool],
        known: Callable[[str], bool],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._known = known
        # Updated once per task: lock-free families (see squire_kernel.metrics).
        self.tasks = CounterFamily(
            "squire_worker_tasks", "Tasks reported by this worker, by operation and outcome.",
            ["operation", "outcome"],
        )
        self.execution = HistogramFamily(
            "squire_worker_execution_seconds", "Task execution time, by operation.",
            ["operation"],
            buckets=EXECUTION_BUCKETS,
        )
        self.retries = CounterFamily(
            "squire_worker_retries", "Transient-error retries, by operation.", ["operation"],
        )
        r.register(FamiliesCollector([self.tasks, self.execution, self.retries]))
        # (operation, kind) -> its label, ok counter and execution histogram
        self._by_task: dict[tuple[str, int], tuple[str, CounterChild, HistogramChild]] = {}
        self.reconnects = Counter(
            "squire_worker_reconnects", "Streams to the orchestrator re-opened after a break.",
            registry=r,
        )
        Gauge("squire_worker_busy_slots", "Tasks executing now.", registry=r).set_function(
            lambda: float(busy())
        )
        Gauge("squire_worker_capacity", "Tasks this worker executes at once.",
              registry=r).set(capacity)
        Gauge("squire_worker_ready", "1 while connected and taking tasks.",
              registry=r).set_function(lambda: 1.0 if ready() else 0.0)

    def series(self, operation: str, kind: int) -> tuple[str, CounterChild, HistogramChild]:
        """A task's operation label, its ok counter and its execution histogram."""
        cached = self._by_task.get((operation, kind))
        if cached is None:
            op = operation if self._known(operation) else "unknown"
            if kind == COMBINE:
                op += " (combine)"
            cached = (op, self.tasks.labels(op, "ok"), self.execution.labels(op))
            # Unknown names share one label, so a flood of them adds no series.
            if op != "unknown":
                self._by_task[(operation, kind)] = cached
        return cached

    def record_results(self, results: Iterable[Report]) -> None:
        """Count reported results and observe their execution times.

        Consecutive results nearly always share operation and kind: their
        series are looked up once per run of them, their ok results counted
        once, and their executions within the histogram's first bucket
        observed once, as their mean (the same bucket count and sum).
        """
        operation: str | None = None
        kind = -1
        label = ""
        ok: CounterChild | None = None
        execution: HistogramChild | None = None
        ok_count = fast_count = 0
        fast_seconds = 0.0
        for task, outcome in results:
            if task.operation != operation or task.kind != kind:
                if ok_count:
                    _count_oks(ok, execution, ok_count, fast_count, fast_seconds)
                    ok_count = fast_count = 0
                    fast_seconds = 0.0
                operation, kind = task.operation, task.kind
                label, ok, execution = self.series(operation, kind)
            assert execution is not None
            seconds = task.elapsed
            if isinstance(outcome, bytes):
                ok_count += 1
                if seconds <= FIRST_EXECUTION_BUCKET:
                    fast_count += 1
                    fast_seconds += seconds
                else:
                    execution.observe(seconds)
            else:
                self.tasks.labels(label, _OUTCOME[outcome.kind]).value += 1
                if outcome.kind is ErrorKind.OPERATION:
                    execution.observe(seconds)
            if task.retries:
                self.retries.labels(label).value += task.retries
        if ok_count:
            _count_oks(ok, execution, ok_count, fast_count, fast_seconds)


def _count_oks(
    ok: CounterChild | None,
    execution: HistogramChild | None,
    ok_count: int,
    fast_count: int,
    fast_seconds: float,
) -> None:
    assert ok is not None and execution is not None
    ok.value += ok_count
    if fast_count:
        # The mean of values in the first bucket is in it too: one
        # observation of it ``fast_count`` times gives the same count and sum.
        execution.observe(fast_seconds / fast_count, fast_count)


class ProbeServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        live: Callable[[], bool],
        ready: Callable[[], bool],
        host: str,
        port: int,
    ) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/livez"):
                    ok = live()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"closed\n")
                elif path == "/readyz":
                    ok = ready()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds would flood the log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="squire-worker-probe", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
