"""The orchestrator process: a grpc.aio server around the Router, with
health, reflection, a ticker for lease and no-worker timeouts, and one
shutdown contract: stop taking work, drain, wait up to a grace period,
cancel the rest, close."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import time
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._channel_servicer import ChannelServicer
from orchestrator_service._core import Router
from orchestrator_service._directive_servicer import DirectiveServicer
from orchestrator_service._durable import Durable, Retention
from orchestrator_service._events import AcceptingStopped, DrainRequested, TenantsChanged, Tick
from orchestrator_service._hub import Hub
from orchestrator_service._interceptor import SecurityInterceptor
from orchestrator_service._journal import Store, open_store
from orchestrator_service._journal_types import DEFAULT_LEASE_TTL
from orchestrator_service._leadership import Leadership, StandbyInterceptor
from orchestrator_service._metrics import OrchestratorMetrics
from orchestrator_service._model import RouterConfig
from orchestrator_service._reflection import enable_reflection
from orchestrator_service._security import (
    Limits,
    SecurityConfig,
    announce_protection,
    check_listen,
    credential_files,
    server_credentials,
)
from orchestrator_service._security import reload as reload_security
from orchestrator_service._servicer import (
    StatusServicer,
    WorkerServicer,
)
from orchestrator_service._sole_leader import default_holder
from orchestrator_service._strict import StrictWireInterceptor
from orchestrator_service._tenants import shares_of
from squire_kernel import __version__
from squire_kernel.listen import check_free, listen_error

log = logging.getLogger("squire.orchestrator")

# Health of the process itself: SERVING from start-up to shutdown, for a
# leader and a standby alike (Kubernetes readiness of replicas on a shared
# store; service "" is SERVING on the leader alone).
UP_SERVICE = "squire.orchestrator.up"
SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("WorkerService", "ChannelService", "DirectiveService", "StatusService")
)


COMPACT_INTERVAL = 30.0  # seconds between journal compactions, when something was removed


class State(enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"  # serving health and status; waiting for the leader lease
    RUNNING = "running"
    DRAINING = "draining"
    CLOSED = "closed"


@dataclass(frozen=True)
class OrchestratorConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    grace: float = 30.0  # seconds running directives get on shutdown
    max_message_bytes: int = 64 * 1024 * 1024
    tick_interval: float = 0.2
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_host: str = "0.0.0.0"
    router: RouterConfig = field(default_factory=RouterConfig)
    # TLS, tokens and per-client limits: see _security and docs/SECURITY.md.
    security: SecurityConfig = field(default_factory=SecurityConfig)
    credentials_poll: float = 1.0  # seconds between looks at the credential files
    limits: Limits = field(default_factory=Limits)
    health_port: int = 0  # plaintext grpc.health.v1 alone, for probes; 0 = off
    # The journal (see _journal): "memory:" keeps nothing across a restart;
    # "sqlite:///path/journal.db" makes directives durable.
    store: str = "memory:"
    synchronous: str = "normal"
    retention: Retention = field(default_factory=Retention)
    # A shared store (Postgres): where this replica serves, as standbys name
    # it ("" = host:port), and the leader lease's TTL.
    advertise: str = ""
    lease_ttl: float = DEFAULT_LEASE_TTL


class Orchestrator:
    """``async with Orchestrator(config) as orch:`` serves until shutdown()."""

    def __init__(self, config: OrchestratorConfig | None = None) -> None:
        self.config = config or OrchestratorConfig()
        self.store: Store = open_store(self.config.store, synchronous=self.config.synchronous)
        router_config = self.config.router
        if self.store.durable and not router_config.journal:
            router_config = dataclasses.replace(router_config, journal=True)
        self.router = Router(router_config, time.monotonic)
        self.hub = Hub(self.router)
        if self.config.security.tenants is not None:
            self.hub.handle(TenantsChanged(shares_of(self.config.security.tenants)))
        self.durable = Durable(self.hub, self.config.retention)
        # host:pid plus a nonce: two orchestrators of one process (tests) are two holders
        holder = f"{default_holder()}:{os.urandom(3).hex()}"
        self.leadership = Leadership(self.store, holder, "", self.config.lease_ttl)
        self.deposed = False  # it led, and lost the lease: the process should exit 1
        self._leading: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.epoch = 0
        self.resumed = 0  # directives restored from the journal at start
        self.recovery_seconds = 0.0
        self.state = State.STARTING
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._ticker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._gate: SecurityInterceptor | None = None
        self.reloads = 0  # times the credentials were read again and changed
        self._stopped = asyncio.Event()
        self.metrics: OrchestratorMetrics | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        if self.state is not State.STARTING:
            raise RuntimeError(f"cannot start an orchestrator that is {self.state.value}")
        limit = self.config.max_message_bytes
        security = self.config.security
        check_listen(self.config.host, security, announce=False)
        self._gate = SecurityInterceptor(security, self.config.limits, self.router)
        server = grpc.aio.server(
            interceptors=[self._gate,
                          StandbyInterceptor(self.leadership), StrictWireInterceptor()],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_WorkerServiceServicer_to_server(WorkerServicer(self.hub), server)
        pb_grpc.add_ChannelServiceServicer_to_server(ChannelServicer(self.hub), server)
        self.metrics = OrchestratorMetrics(self.router, asyncio.get_running_loop())
        self.hub.on_tasks_done = self.metrics.tasks_done
        self.hub.on_directive_end = self.metrics.directive_ended
        if self.config.metrics_port:
            try:
                self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
            except OSError as exc:
                raise listen_error(
                    self.config.metrics_host, self.config.metrics_port, "--metrics-port", exc
                ) from exc
        pb_grpc.add_DirectiveServiceServicer_to_server(
            DirectiveServicer(self.hub, self.durable), server
        )
        pb_grpc.add_StatusServiceServicer_to_server(
            StatusServicer(self.hub, lambda: self.state.value, __version__), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection((*SERVICE_NAMES, health.SERVICE_NAME), server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            check_free(self.config.host, self.config.port, "--port")
            if self.config.health_port:  # checked before the API server starts
                check_free(self.config.host, self.config.health_port, "--health-port")
        except OSError:
            self.metrics.close()
            raise
        try:
            if security.tls:
                self.port = server.add_secure_port(address, server_credentials(security))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind to address"
            self.port = 0
        if not self.port:
            self.metrics.close()
            raise listen_error(self.config.host, self.config.port, "--port")
        self.leadership.address = self.config.advertise or f"{self.config.host}:{self.port}"
        if self.store.durable and not self.store.shared:
            try:
                await self._recover()  # before serving: callers reattach to what it restores
            except BaseException:
                self.metrics.close()
                await self.store.close()
                raise
        # grpc's health servicer starts with "" SERVING: not until this leads.
        await self._set_serving(False)
        await server.start()
        self._server = server
        announce_protection(self.config.host, security)  # bound: the start did not fail
        if credential_files(security):
            self._watcher = asyncio.create_task(self._watch_credentials())
        if self.config.health_port:
            await self._serve_health()
        await self._health.set(UP_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.store.shared:
            # Serving as a standby (health NOT_SERVING) until the lease is ours.
            self.state = State.STANDBY
            self._leading = asyncio.create_task(self._lead())
            log.info("orchestrator listening as a standby",
                     extra={"address": f"{self.config.host}:{self.port}"})
            return self.port
        self._ticker = asyncio.create_task(self._tick())
        await self._set_serving(True)
        self.state = State.RUNNING
        log.info("orchestrator listening", extra={"address": f"{self.config.host}:{self.port}"})
        return self.port

    async def wait_leading(self) -> None:
        """Until this replica leads (at once on a store of one process)."""
        while self.state in (State.STARTING, State.STANDBY):
            if self._leading is not None and self._leading.done():
                self._leading.result()  # its failure, raised here
                return
            await asyncio.sleep(0.05)

    async def _lead(self) -> None:
        """Campaign; once leading, restore and serve; stop when the lease is lost."""
        try:
            epoch = await self.leadership.campaign()
            log.info("took the leader lease", extra={"epoch": epoch})
            await self._recover()
        except Exception:
            log.exception("cannot lead: stopping")
            self.deposed = True
            self._stopping = asyncio.create_task(self.shutdown(0))
            raise
        self._ticker = asyncio.create_task(self._tick())
        await self._set_serving(True)
        self.state = State.RUNNING
        log.info("orchestrator leading", extra={
            "address": self.leadership.address, "epoch": self.epoch,
            "resumed": self.resumed, "channels_resumed": self.durable.channels_resumed,
            "recovery_seconds": round(self.recovery_seconds, 3),
        })
        await self.store.lost.wait()
        if self.state is not State.RUNNING:
            return  # it is shutting down and resigned
        log.error("lost the leader lease (a newer epoch took it, or it lapsed): stopping; "
                  "directives go on at the new leader", extra={"epoch": self.epoch})
        self.deposed = True
        self.leadership.leading = False
        self.hub.closing = "this orchestrator lost its leadership; reattach to the new leader"
        self.hub.wake_all()
        self._stopping = asyncio.create_task(self.shutdown(0))

    async def reload_credentials(self) -> bool:
        """Read the token files and the tenants file again (on SIGHUP, or
        when one changes): new calls use them at once, open calls whose
        token was revoked end with UNAUTHENTICATED, the core takes the new
        weights and quotas. A file that does not parse changes nothing (the
        error is logged). Returns whether anything changed."""
        old = self.config.security
        try:
            new = await asyncio.to_thread(reload_security, old)
        except (OSError, ValueError) as exc:
            log.error("credentials not reloaded, the old ones stay: %s", exc)
            return False
        if new == old:
            return False
        self.config = dataclasses.replace(self.config, security=new)
        revoked = self._gate.update(new) if self._gate is not None else 0
        if new.tenants is not None:
            self.hub.handle(TenantsChanged(shares_of(new.tenants)))
        self.reloads += 1
        log.info("credentials reloaded", extra={
            "worker_tokens": len(new.worker_tokens), "client_tokens": len(new.client_tokens),
            "tenants": len(new.tenants.by_name) if new.tenants else 0,
            "calls_revoked": revoked,
        })
        return True

    async def _watch_credentials(self) -> None:
        """Reload when a credential file changes (a Kubernetes Secret is
        swapped by a symlink: its target's identity changes)."""
        def signature() -> tuple[tuple[int, int, int, int], ...]:
            out = []
            for path in credential_files(self.config.security):
                try:
                    st = os.stat(path)
                    out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
                except OSError:
                    out.append((0, 0, 0, 0))
            return tuple(out)

        seen = await asyncio.to_thread(signature)
        while True:
            await asyncio.sleep(self.config.credentials_poll)
            now = await asyncio.to_thread(signature)
            if now != seen:
                seen = now
                await self.reload_credentials()

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    async def shutdown(self, grace: float | None = None) -> None:
        """Idempotent: refuse new directives (UNAVAILABLE), then stop.

        Without a journal, running directives get ``grace`` seconds to
        finish and the workers are drained (told to finish and leave). With
        one, running directives and leased channels stay in the journal:
        their calls end with UNAVAILABLE (the SDKs reattach to the next
        start), and the workers are not drained (they reconnect to it)."""
        if self.state in (State.DRAINING, State.CLOSED):
            await self._stopped.wait()
            return
        grace = self.config.grace if grace is None else grace
        standby = self.state is State.STANDBY
        self.state = State.DRAINING
        if self._leading is not None and not self._leading.done():
            self._leading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._leading
        if standby:
            await self._stop_serving(grace)
            return
        self.hub.handle(AcceptingStopped())
        await self._set_serving(False)
        log.info("orchestrator draining", extra={"grace": grace})
        deadline = time.monotonic() + grace
        # Polling: the core has no "all channels gone" event, and this runs once.
        while self._must_wait() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self.store.durable:
            # What still runs is journaled: its callers reattach to the next start.
            self.hub.closing = self.hub.closing or (
                "the orchestrator is restarting; the directive goes on: reattach by its id"
            )
            self.hub.wake_all()
        else:
            self.hub.handle(DrainRequested(max(0.0, deadline - time.monotonic())))
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self._stop_serving(max(0.1, min(1.0, deadline - time.monotonic())))

    async def _stop_serving(self, grace: float) -> None:
        """Stop the servers and close the store (which gives up a leader lease
        at once: a standby takes over without waiting for its TTL)."""
        await self._set_serving(False)
        await self._health.set(UP_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.metrics is not None:
            self.metrics.close()
        await self.store.close()
        self.state = State.CLOSED
        self._stopped.set()
        log.info("orchestrator stopped")

    async def __aenter__(self) -> Orchestrator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown(grace=0 if exc is not None else None)

    # ------------------------------------------------------------- private

    async def _serve_health(self) -> None:
        """Health alone on a plaintext port: Kubernetes gRPC probes cannot speak TLS."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        address = f"{self.config.host}:{self.config.health_port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # grpcio's "Failed to bind to address"
            bound = 0
        if not bound:
            raise listen_error(self.config.host, self.config.health_port, "--health-port")
        await server.start()
        self._health_server = server

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _recover(self) -> None:
        recovered = await self.store.open()
        started = time.monotonic()
        self.epoch = recovered.epoch
        self.router.begin_epoch(recovered.epoch)
        self.hub.journal_to(self.store)
        self.resumed = self.durable.recover(recovered)
        self.recovery_seconds = recovered.seconds + time.monotonic() - started
        if self.metrics is not None:
            self.metrics.watch_journal(self.store, self.recovery_seconds, self.resumed)
        log.info(
            "journal opened",
            extra={
                "store": self.store.url, "epoch": self.epoch, "resumed": self.resumed,
                "channels_resumed": self.durable.channels_resumed,
                "finished_unread": len(self.hub.ended),
                "recovery_seconds": round(self.recovery_seconds, 3),
            },
        )

    def _must_wait(self) -> bool:
        # With a journal nothing needs to finish: directives and leased
        # channels go on at the next start.
        return not self.store.durable and bool(self.router.channels)

    async def _tick(self) -> None:
        compacted_at, removed = time.monotonic(), 0
        compacting: asyncio.Task[None] | None = None
        while True:
            await asyncio.sleep(self.config.tick_interval)
            self.hub.handle(Tick())
            if not self.store.durable:
                continue
            self.durable.sweep()
            # Give the space of removed directives back now and then (off the loop).
            now = time.monotonic()
            if (self.hub.removed != removed and now - compacted_at >= COMPACT_INTERVAL
                    and (compacting is None or compacting.done())):
                removed, compacted_at = self.hub.removed, now
                compacting = asyncio.create_task(self.store.compact())
