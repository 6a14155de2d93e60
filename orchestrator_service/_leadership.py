"""Leadership: on a shared store (Postgres) one orchestrator leads, the
others stand by.

Every replica serves gRPC from the start. A standby answers health
NOT_SERVING (so a Kubernetes Service, or a client's health-checked
round-robin over several addresses, routes to the leader alone) and refuses
directive, worker and channel calls with UNAVAILABLE naming the leader. It
campaigns for the store's leader lease; once it holds it, it opens the
journal under the lease's epoch, restores every directive and serves. A
leader that loses the lease (it lapsed while the process was frozen, or a
newer epoch took it) stops at once: its writes are fenced by the store, and
the process exits so that it comes back as a standby.

On a store of one process (SQLite, memory) the process always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc

from orchestrator_service._interceptor import CHANNEL_SERVICE, DIRECTIVE_SERVICE, WORKER_SERVICE
from orchestrator_service._journal_types import Leader, Store

log = logging.getLogger("squire.orchestrator")

# What a standby refuses: everything that would read or change the journal.
REFUSED = frozenset({DIRECTIVE_SERVICE, WORKER_SERVICE, CHANNEL_SERVICE})


class Leadership:
    def __init__(self, store: Store, holder: str, address: str, ttl: float) -> None:
        self.store = store
        self.holder = holder
        self.address = address  # where this replica serves, as a standby names it
        self.ttl = ttl
        self.leading = not store.shared
        self.leader: Leader | None = None  # the current leader, as a standby last saw it

    async def campaign(self) -> int:
        """Wait for the lease (naming the leader meanwhile); returns the epoch."""
        watcher = asyncio.create_task(self._watch_leader())
        try:
            epoch = await self.store.campaign(self.holder, self.address, self.ttl)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self.leading = True
        self.leader = Leader(self.holder, self.address, epoch)
        return epoch

    async def _watch_leader(self) -> None:
        while True:
            try:
                leader = await self.store.leader()
            except Exception as exc:  # the store is down: say so, keep trying
                log.warning("standby: cannot read the leader lease: %s", exc)
                leader = None
            if leader != self.leader:
                self.leader = leader
                if leader is not None:
                    log.info("standby: the leader is %s (epoch %d)", leader.address, leader.epoch)
            await asyncio.sleep(max(0.2, self.ttl / 3))

    def refusal(self) -> str:
        leader = self.leader
        if leader is not None and leader.holder != self.holder:
            where = leader.address or leader.holder
            return (f"this orchestrator is a standby; the leader is {where} "
                    f"(epoch {leader.epoch})")
        return ("this orchestrator is a standby and no leader holds the lease right now "
                "(a takeover is under way): try again shortly")


class StandbyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """While not leading: directive, worker and channel calls get UNAVAILABLE
    naming the leader; health, status and reflection answer as usual."""

    def __init__(self, leadership: Leadership) -> None:
        self._leadership = leadership

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._leadership.leading:
            return handler
        service = handler_call_details.method[1:].rsplit("/", 1)[0]
        if service not in REFUSED:
            return handler
        message = self._leadership.refusal()

        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        slot = ("stream_stream" if handler.response_streaming else "stream_unary") \
            if handler.request_streaming else \
            ("unary_stream" if handler.response_streaming else "unary_unary")
        return handler._replace(**{slot: refuse})
