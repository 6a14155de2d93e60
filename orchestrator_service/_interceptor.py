"""The orchestrator's gate: a ``grpc.aio`` server interceptor that checks
tokens and roles, then per-client and overall limits, before a call reaches
the servicers.

    WorkerService                    worker token    (the worker stream)
    ChannelService, DirectiveService,
    StatusService                    client token
    grpc.health.v1, reflection       open (probes, tooling)

No or an unknown token: UNAUTHENTICATED; a valid token of the other role:
PERMISSION_DENIED; a limit: RESOURCE_EXHAUSTED naming the limit. Tokens are
compared as SHA-256 digests with ``hmac.compare_digest`` against every
configured token (no early exit), and never logged or echoed.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service._core import Router
from orchestrator_service._security import Limits, Role, SecurityConfig, TokenEntry, digest

log = logging.getLogger("squire.orchestrator")

_PACKAGE = pb.DESCRIPTOR.package
ROLE_OF_SERVICE = {
    f"{_PACKAGE}.WorkerService": Role.WORKER,
    f"{_PACKAGE}.ChannelService": Role.CLIENT,
    f"{_PACKAGE}.DirectiveService": Role.CLIENT,
    f"{_PACKAGE}.StatusService": Role.CLIENT,
}
RUN_DIRECTIVE = f"/{_PACKAGE}.DirectiveService/RunDirective"
LEASE_CHANNEL = f"/{_PACKAGE}.ChannelService/LeaseChannel"
_BEARER = "bearer "

Guard = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, config: SecurityConfig, limits: Limits, router: Router) -> None:
        self._auth = config.auth
        self._tokens: tuple[TokenEntry, ...] = config.token_entries()
        self._limits = limits
        self._router = router
        self._directives: Counter[str] = Counter()  # client -> running directives
        self._channels: dict[str, set[str]] = {}  # client -> leased channel ids

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        role = ROLE_OF_SERVICE.get(method[1:].rsplit("/", 1)[0])
        if handler is None or role is None:
            return handler  # health, reflection, or UNIMPLEMENTED
        client: str | None = None  # None: identify by peer address
        if self._auth:
            entry, problem = self._authenticate(handler_call_details.invocation_metadata)
            if entry is None:
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                             f"{problem}; {method} needs a {role.value} token "
                             "as 'authorization: Bearer <token>' call metadata")
            if entry.role is not role:
                return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"a {entry.role.value} token may not call {method}, "
                             f"which needs a {role.value} token")
            client = entry.label
        if method == RUN_DIRECTIVE:
            return _guarded(handler, lambda ctx: self._directive_slot(client or _peer(ctx), ctx))
        if method == LEASE_CHANNEL:
            return self._lease_guarded(handler, client)
        return handler

    # ----------------------------------------------------------- tokens

    def _authenticate(self, metadata: Any) -> tuple[TokenEntry | None, str]:
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if not values:
            return None, "missing credentials"
        if len(values) > 1:
            return None, "more than one authorization entry"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        if not value.lower().startswith(_BEARER):
            return None, "malformed authorization (expected 'Bearer <token>')"
        presented = digest(value[len(_BEARER):].strip())
        found: TokenEntry | None = None
        for entry in self._tokens:  # compare with every token: timing says nothing
            if hmac.compare_digest(entry.digest, presented) and found is None:
                found = entry
        return found, "invalid token"

    # ----------------------------------------------------------- limits

    @contextlib.asynccontextmanager
    async def _directive_slot(
        self, client: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        limits = self._limits
        running = sum(self._directives.values())
        if running >= limits.max_directives:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_directives limit reached: {running} directives are running on the "
                f"orchestrator (--max-directives {limits.max_directives}); retry later",
            )
        if self._directives[client] >= limits.max_directives_per_client:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_directives_per_client limit reached: this client runs "
                f"{self._directives[client]} directives (--max-directives-per-client "
                f"{limits.max_directives_per_client}); wait for one to finish",
            )
        self._directives[client] += 1
        try:
            yield
        finally:
            self._directives[client] -= 1
            if not self._directives[client]:
                del self._directives[client]

    def _lease_guarded(
        self, handler: grpc.RpcMethodHandler, token_client: str | None
    ) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        assert inspect.iscoroutinefunction(inner), "servicers are async"

        async def lease(request: Any, context: grpc.aio.ServicerContext) -> Any:
            client = token_client or _peer(context)
            await self._check_channels(client, context)
            response = await inner(request, context)
            self._channels.setdefault(client, set()).add(response.channel_id)
            return response

        return handler._replace(unary_unary=lease)

    async def _check_channels(self, client: str, context: grpc.aio.ServicerContext) -> None:
        limits = self._limits
        channels = self._router.channels
        # External channels only: a directive's channel counts as a directive.
        open_total = sum(1 for c in channels.values() if c.directive is None)
        if open_total >= limits.max_channels:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_channels limit reached: {open_total} leased channels are open on the "
                f"orchestrator (--max-channels {limits.max_channels}); release channels "
                "you no longer use",
            )
        owned = {cid for cid in self._channels.get(client, ()) if cid in channels}
        if owned:
            self._channels[client] = owned
        else:
            self._channels.pop(client, None)
        if len(owned) >= limits.max_channels_per_client:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_channels_per_client limit reached: this client holds {len(owned)} "
                f"leased channels (--max-channels-per-client {limits.max_channels_per_client}); "
                "release channels you no longer use",
            )


def _peer(context: grpc.aio.ServicerContext) -> str:
    """The peer's host ("ipv4:10.0.0.7"): one client however many connections it opens."""
    peer: str = context.peer() or "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host.count(":") >= 1 else peer


def _handler_slot(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
          ) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return handler._replace(**{_handler_slot(handler): deny})


def _guarded(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """``handler`` run inside ``guard(context)``, keeping its kind.

    grpc.aio picks how to drive a handler by inspecting the function
    (coroutine or async generator), so the wrapper must be of the same kind.
    """
    slot = _handler_slot(handler)
    inner = getattr(handler, slot)
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(context):
                async for response in inner(request, context):
                    yield response

        return handler._replace(**{slot: stream})
    assert inspect.iscoroutinefunction(inner), "servicers are async"

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with guard(context):
            return await inner(request, context)

    return handler._replace(**{slot: call})
