"""The WorkerRuntime: connect, run stream sessions, reconnect, drain, close.

    starting --> connecting <--> running
        |             |               |
        +-------------+---------------+--> draining --> closed

``run()`` owns everything: the executor, and one connect loop (in a
TaskGroup) that opens a stream, says hello, runs a ``Connection`` until the
stream ends, and reconnects with jittered exponential backoff. A drain stops
the loop: a welcomed session drains gracefully; a connection attempt or a
backoff wait, which hold no tasks, is simply cancelled.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from types import TracebackType

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from squire_kernel import __version__
from squire_kernel.listen import ListenError, listen_error
from squire_kernel.operations import Registry, import_ops_module
from worker_service import _credentials, _wire
from worker_service._abort import AbortMemory
from worker_service._config import ExecutorKind, WorkerConfig
from worker_service._connection import Carry, Connection
from worker_service._errors import HelloRejected, LifecycleError, OpsLoadError
from worker_service._executor import Executor, InlineExecutor, ProcessExecutor, ThreadExecutor
from worker_service._probe import ProbeServer, WorkerMetrics
from worker_service._state import Lifecycle, WorkerState

log = logging.getLogger("worker_service")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Used when the Welcome does not say how often to send heartbeats.
DEFAULT_HEARTBEAT_INTERVAL = 5.0
# After the worker closes, how long tasks abandoned by a broken stream or
# handed back at the drain deadline may take before pool children are killed.
EXECUTOR_CLOSE_GRACE = 0.5
# With the default metrics port taken (another worker on this machine), the
# next free one of this many is used.
METRICS_FALLBACK_PORTS = 100

# Retrying cannot fix these answers to a hello. ALREADY_EXISTS is different
# after a session has run: the orchestrator may not have noticed yet that the
# old stream is gone, so it is retried then (see _handshake).
_REJECTING = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
})


def load_registry(modules: tuple[str, ...]) -> Registry:
    """Import the ops modules by name or file path; OpsLoadError says which one
    failed and why."""
    registry = Registry()
    for name in modules:
        try:
            registry.add_module(import_ops_module(name))
        except Exception as exc:
            raise OpsLoadError(
                f"cannot load ops module {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
    if not registry:
        raise OpsLoadError(f"the ops modules {', '.join(modules)} offer no operation or monoid")
    return registry


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Seconds before reconnect attempt ``attempt`` (1-based): doubling, capped, jittered.

    Jitter keeps a fleet of workers from reconnecting in lockstep after the
    orchestrator restarts.
    """
    delay: float = min(high, low * 2.0 ** min(attempt - 1, 32))
    return delay * random.uniform(0.5, 1.0)


class WorkerRuntime:
    """A worker: connects to the orchestrator and executes the tasks it sends.

    ``async with WorkerRuntime(config) as worker:`` runs it in the background
    and drains it on exit; or ``await worker.run()`` and call
    ``request_drain()`` / ``await shutdown()`` from elsewhere.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        registry: Registry | None = None,
        metrics_port_fallback: bool = False,
    ) -> None:
        """``metrics_port_fallback``: when ``config.metrics_port`` is taken,
        serve the probes on the next free port above it (and log which), so
        that several workers on one machine need no flags; otherwise a taken
        port is a ListenError."""
        self.config = config
        self._metrics_port_fallback = metrics_port_fallback
        self.registry = registry if registry is not None else load_registry(config.ops)
        if not self.registry:
            raise OpsLoadError("the registry offers no operation or monoid")
        self._lifecycle = Lifecycle()
        self._aborted = AbortMemory(config.abort_memory, time.monotonic)
        self._executor: Executor | None = None
        self._run_claimed = False
        self._session: Connection | None = None
        # What the last stream left: tasks running on, results not written.
        self._carry = Carry()
        self._connect_task: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._rejected: HelloRejected | None = None
        self._drain_grace = config.drain_grace
        self._welcomed_once = False
        self._closed = asyncio.Event()
        self.metrics: WorkerMetrics | None = None
        self._probe: ProbeServer | None = None
        self.probe_port = 0

    # ------------------------------------------------------------ probes

    @property
    def state(self) -> WorkerState:
        return self._lifecycle.state

    @property
    def ready(self) -> bool:
        """Connected, welcomed and taking tasks (the readiness probe)."""
        return self._lifecycle.state is WorkerState.RUNNING

    @property
    def live(self) -> bool:
        """Not closed (the liveness probe): a draining or reconnecting worker is alive."""
        return self._lifecycle.state is not WorkerState.CLOSED

    @property
    def session_stats(self) -> tuple[int, int]:
        """(running, buffered) tasks of the current stream session."""
        session = self._session
        return (0, 0) if session is None else (session.running, session.buffered)

    # --------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Run until drained. Raises HelloRejected, or OpsLoadError from pool children."""
        self._claim_run()
        await self._run()

    def _claim_run(self) -> None:
        # Claimed synchronously, so `async with` followed by an immediate
        # shutdown() waits for the run it started instead of racing it.
        if self._run_claimed or self._lifecycle.state is not WorkerState.STARTING:
            raise LifecycleError(f"run() needs a new worker; this one is {self.state}")
        self._run_claimed = True

    def _start_probe(self) -> None:
        config = self.config
        self.metrics = WorkerMetrics(
            capacity=config.concurrency,
            busy=lambda: self.session_stats[0],
            ready=lambda: self.ready,
            known=lambda op: op in self.registry.operations or op in self.registry.monoids,
        )
        if config.metrics_port:
            self._probe = self._bind_probe(self.metrics)
            self._probe.start()
            self.probe_port = self._probe.port

    def _bind_probe(self, metrics: WorkerMetrics) -> ProbeServer:
        host, port = self.config.metrics_host, self.config.metrics_port
        tries = METRICS_FALLBACK_PORTS if self._metrics_port_fallback else 1
        last = min(port + tries, 65536) - 1
        candidate = port
        while True:
            try:
                probe = ProbeServer(metrics, lambda: self.live, lambda: self.ready, host, candidate)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and candidate < last:
                    candidate += 1
                    continue
                if candidate != port:
                    raise ListenError(
                        f"cannot listen on {host}: ports {port}-{candidate} are all in use; "
                        "choose another port with --metrics-port (or SQUIRE_METRICS_PORT)"
                    ) from exc
                raise listen_error(host, port, "--metrics-port", exc) from exc
            if candidate != port:
                log.warning(
                    "metrics port %d is taken: serving /metrics, /healthz and /readyz on %d "
                    "(--metrics-port sets it)", port, candidate,
                )
            return probe

    async def _run(self) -> None:
        executor = self._executor = self._make_executor()
        executor.attach(self._carry.events.append)
        self._start_probe()
        try:
            if self._lifecycle.state is WorkerState.STARTING:
                await executor.start()
            if self._lifecycle.state is WorkerState.STARTING:  # no drain meanwhile
                self._lifecycle.to(WorkerState.CONNECTING)
                log.info(
                    "worker %s: %d operation(s), %d monoid(s), %s executor x%d, "
                    "prefetch %d, orchestrator %s",
                    self.config.worker_id, len(self.registry.operations),
                    len(self.registry.monoids), self.config.executor.value,
                    self.config.concurrency, self.config.effective_prefetch,
                    self.config.orchestrator,
                )
                async with asyncio.TaskGroup() as tg:
                    self._connect_task = tg.create_task(self._connect_loop())
            if self._rejected is not None:
                raise self._rejected
        finally:
            await executor.close(EXECUTOR_CLOSE_GRACE)
            self._lifecycle.to(WorkerState.CLOSED)
            if self._probe is not None:
                self._probe.close()
            self._closed.set()
            log.info("worker %s closed", self.config.worker_id)

    def request_drain(self, grace: float | None = None) -> None:
        """Start draining; idempotent and safe to call from a signal handler.

        ``grace`` (default ``config.drain_grace``) is how long running tasks
        may take before they are handed back.
        """
        state = self._lifecycle.state
        if state in (WorkerState.DRAINING, WorkerState.CLOSED):
            return
        self._lifecycle.to(WorkerState.DRAINING)
        if grace is not None:
            self._drain_grace = grace
        log.info("draining (grace %.1fs)", self._drain_grace)
        if self._session is not None:
            self._session.begin_drain(self._drain_grace)
        elif self._connect_task is not None:
            # Connecting or waiting to reconnect: nothing is held, stop now.
            self._connect_task.cancel()

    def expire_drain(self) -> None:
        """Cut a drain short: hand back the tasks still running at once."""
        if self._lifecycle.state is not WorkerState.DRAINING:
            self.request_drain()
        if self._session is not None:
            self._session.expire_drain()

    async def shutdown(self, grace: float | None = None) -> None:
        """Drain and wait until closed. Idempotent."""
        if not self._run_claimed:  # never ran: nothing to drain
            if self._lifecycle.state is not WorkerState.CLOSED:
                self._lifecycle.to(WorkerState.CLOSED)
                self._closed.set()
            return
        self.request_drain(grace)
        await self._closed.wait()

    async def __aenter__(self) -> WorkerRuntime:
        self._claim_run()
        self._runner = asyncio.create_task(self._run(), name=f"worker {self.config.worker_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            if exc is None:
                await runner  # surfaces HelloRejected and the like
            else:
                await asyncio.wait((runner,))
                if not runner.cancelled():
                    runner.exception()  # retrieved: the body's exception wins

    # ----------------------------------------------------------- internals

    def _make_executor(self) -> Executor:
        config = self.config
        if config.executor is ExecutorKind.INLINE:
            # Inline runs a batch back to back: it holds at most the window.
            return InlineExecutor(self.registry, config.window)
        if config.executor is ExecutorKind.THREAD:
            return ThreadExecutor(self.registry, config.concurrency)
        return ProcessExecutor(config.ops, config.concurrency)

    async def _connect_loop(self) -> None:
        attempt = 0
        while self._lifecycle.state is WorkerState.CONNECTING:
            try:
                welcomed = await self._connect_once()
            except HelloRejected as exc:
                # Raised from run(), not logged here: whoever runs the worker
                # reports it (the command line logs it once).
                self._rejected = exc
                return
            except (
                grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError, _NoWelcome,
            ) as exc:
                welcomed = False
                log.warning("cannot connect to %s: %s", self.config.orchestrator, _describe(exc))
            except Exception:
                # A bug in a session must not kill the worker: log it loudly
                # and start over on a fresh stream, backing off as it repeats.
                welcomed = False
                log.exception("stream session failed")
            if self._lifecycle.state is not WorkerState.CONNECTING:
                return
            attempt = 1 if welcomed else attempt + 1
            delay = backoff_delay(attempt, self.config.reconnect_min, self.config.reconnect_max)
            log.info("reconnecting in %.2fs", delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> bool:
        """One stream: hello, welcome, session. True if the session was welcomed."""
        assert self._executor is not None
        config = self.config
        async with _credentials.open_channel(config, _CHANNEL_OPTIONS) as ch:
            call = pb_grpc.WorkerServiceStub(ch).Connect(
                metadata=_credentials.call_metadata(config)
            )
            try:
                welcome = await self._handshake(call)
                session = Connection(
                    call,
                    executor=self._executor,
                    aborted=self._aborted,
                    window=config.window,
                    heartbeat_interval=welcome.heartbeat_interval_seconds
                    or DEFAULT_HEARTBEAT_INTERVAL,
                    on_drain_request=self.request_drain,
                    metrics=self.metrics,
                    carry=self._carry,
                )
                if self._welcomed_once and self.metrics is not None:
                    self.metrics.reconnects.inc()
                self._session = session
                self._welcomed_once = True
                self._lifecycle.to(WorkerState.RUNNING)
                log.info("connected to %s, session %s", config.orchestrator, welcome.session_id)
                try:
                    await session.run()
                finally:
                    self._carry = session.carry
                    self._session = None
                    if self._lifecycle.state is WorkerState.RUNNING:
                        self._lifecycle.to(WorkerState.CONNECTING)
                return True
            finally:
                call.cancel()  # a no-op once the stream ended cleanly

    async def _handshake(self, call: grpc.aio.StreamStreamCall) -> pb.Welcome:
        config = self.config
        hello = _wire.hello(
            config.worker_id, self.registry.operations, self.registry.monoids,
            config.concurrency, config.effective_prefetch, __version__, self._carry.held(),
        )
        try:
            async with asyncio.timeout(config.handshake_timeout):
                await call.write(hello)
                first = await call.read()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _REJECTING and not (
                code is grpc.StatusCode.ALREADY_EXISTS and self._welcomed_once
            ):
                raise HelloRejected(code.name, exc.details() or "") from exc
            raise
        if first is grpc.aio.EOF:
            raise _NoWelcome("the orchestrator ended the stream before its welcome")
        assert isinstance(first, pb.OrchestratorMessage)
        if first.WhichOneof("kind") != "welcome":
            raise _NoWelcome(f"the orchestrator sent {first.WhichOneof('kind')} before its welcome")
        return first.welcome


class _NoWelcome(Exception):
    """The stream did not start with a Welcome: try again later."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "no welcome in time"
    return f"{type(exc).__name__}: {exc}"


async def run_worker(config: WorkerConfig, *, metrics_port_fallback: bool = False) -> None:
    """Run a worker until it is drained by SIGTERM, SIGINT or the orchestrator.

    The first signal starts a drain; a second one cuts its grace short.
    Raises OpsLoadError or HelloRejected when the worker cannot serve at all.
    """
    import signal

    runtime = WorkerRuntime(config, metrics_port_fallback=metrics_port_fallback)
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if runtime.state is WorkerState.DRAINING:
            log.warning("%s again: handing back running tasks now", sig.name)
            runtime.expire_drain()
        else:
            log.info("%s: draining", sig.name)
            runtime.request_drain()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await runtime.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
