"""The orchestrator's gate: a ``grpc.aio`` server interceptor that checks
tokens and roles, then per-client and overall limits, before a call reaches
the servicers.

    WorkerService                    worker token    (the worker stream)
    grpc.health.v1, reflection       open (probes, tooling)
    every other service              client token    (channels, directives,
                                                      status, and any service
                                                      added later: fail closed)

No or an unknown token: UNAUTHENTICATED; a valid token of the other role:
PERMISSION_DENIED; a limit: RESOURCE_EXHAUSTED naming the limit. Tokens are
compared as SHA-256 digests with ``hmac.compare_digest`` against every
configured token (no early exit), and never logged or echoed.

Directive slots: RunDirective holds one for the whole call. A servicer that
runs several directives in one call (a session) takes one per directive with
:func:`acquire_directive_slot`, which finds the limits and the caller's
identity in a context variable this interceptor sets for DirectiveService.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import inspect
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service._core import Router
from orchestrator_service._model import Code, RouterError
from orchestrator_service._security import Limits, Role, SecurityConfig, TokenEntry, digest
from orchestrator_service._tenants import CALLER, Caller

_PACKAGE = pb.DESCRIPTOR.package
WORKER_SERVICE = f"{_PACKAGE}.WorkerService"
DIRECTIVE_SERVICE = f"{_PACKAGE}.DirectiveService"
CHANNEL_SERVICE = f"{_PACKAGE}.ChannelService"
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
RUN_DIRECTIVE = f"/{DIRECTIVE_SERVICE}/RunDirective"
LEASE_CHANNEL = f"/{_PACKAGE}.ChannelService/LeaseChannel"
_BEARER = "bearer "

Guard = Callable[[grpc.aio.ServicerContext], contextlib.AbstractAsyncContextManager[None]]
MISSING = "missing credentials"
# What an open call was authorised as: the token (digest), its role and tenant.
CallKey = tuple[bytes, Role, str | None]


class DirectiveSlot:
    """One running directive counted against the limits; release() is idempotent."""

    def __init__(self, slots: DirectiveSlots | None, client: str) -> None:
        self._slots = slots
        self._client = client

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.running[self._client] -= 1
            if not slots.running[self._client]:
                del slots.running[self._client]


class DirectiveSlots:
    """Directives running per client, against max_directives(_per_client)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.running: Counter[str] = Counter()

    def acquire(self, client: str) -> DirectiveSlot:
        limits = self.limits
        total = sum(self.running.values())
        if total >= limits.max_directives:
            raise RouterError(
                Code.RESOURCE_EXHAUSTED,
                f"max_directives limit reached: {total} directives are running on the "
                f"orchestrator (--max-directives {limits.max_directives}); retry later",
            )
        mine = self.running[client]
        if mine >= limits.max_directives_per_client:
            raise RouterError(
                Code.RESOURCE_EXHAUSTED,
                f"max_directives_per_client limit reached: this client runs {mine} "
                f"directives (--max-directives-per-client {limits.max_directives_per_client}); "
                "wait for one to finish",
            )
        self.running[client] += 1
        return DirectiveSlot(self, client)


_DIRECTIVE_GATE: contextvars.ContextVar[tuple[DirectiveSlots, str] | None] = (
    contextvars.ContextVar("squire_directive_gate", default=None)
)


def acquire_directive_slot() -> DirectiveSlot:
    """A slot for one more directive of the calling client; raises RouterError
    (RESOURCE_EXHAUSTED) past a limit. Call it inside a DirectiveService
    handler (or a task it created); without the interceptor it limits nothing."""
    gate = _DIRECTIVE_GATE.get()
    if gate is None:
        return DirectiveSlot(None, "")
    slots, client = gate
    return slots.acquire(client)


class SecurityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, config: SecurityConfig, limits: Limits, router: Router) -> None:
        self._limits = limits
        self._router = router
        self.directive_slots = DirectiveSlots(limits)
        self._channels: dict[str, set[str]] = {}  # client -> leased channel ids
        # Open streaming calls by token digest: each one's future is set
        # when its token is revoked (``update``), which ends the call.
        self._open: dict[CallKey, set[asyncio.Future[None]]] = {}
        self.update(config)

    def update(self, config: SecurityConfig) -> int:
        """Use ``config``'s tokens and tenants from the next call on; open
        calls whose token (or token's tenant) is gone end with
        UNAUTHENTICATED. Returns how many calls that ended."""
        self._auth = config.auth
        self._tenants = config.tenants is not None
        self._tokens = config.token_entries()
        self._subjects = config.tenants.by_subject() if config.tenants is not None else {}
        now = {(e.digest, e.role, e.tenant) for e in self._tokens}
        revoked = 0
        for key, calls in list(self._open.items()):
            if key not in now:
                for future in calls:
                    if not future.done():
                        future.set_result(None)
                        revoked += 1
        return revoked

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        service = method[1:].rsplit("/", 1)[0]
        if handler is None or service in OPEN_SERVICES:
            return handler  # UNIMPLEMENTED, or open
        role = Role.WORKER if service == WORKER_SERVICE else Role.CLIENT
        client: str | None = None  # None: identify by peer address
        if self._auth:
            entry, problem = self._authenticate(handler_call_details.invocation_metadata)
            if entry is None and problem == MISSING and role is Role.CLIENT and self._subjects:
                # No token: the client certificate's subject may name a tenant
                # (checked per call; limits then count the peer's host).
                handler = _guarded(handler, lambda ctx: self._as_certificate(ctx, method))
            elif entry is None:
                return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                             f"{problem}; {method} needs a {role.value} token "
                             "as 'authorization: Bearer <token>' call metadata")
            elif entry.role is not role:
                return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"a {entry.role.value} token may not call {method}, "
                             f"which needs a {role.value} token")
            else:
                client = entry.label
                if self._tenants and role is Role.CLIENT:
                    who = Caller(entry.tenant or "", admin=entry.admin)
                    handler = _guarded(handler, lambda _ctx: _as_caller(who))
                if handler.request_streaming or handler.response_streaming:
                    handler = self._revocable(handler, (entry.digest, entry.role, entry.tenant))
        if service == DIRECTIVE_SERVICE:
            hold = method == RUN_DIRECTIVE
            return _guarded(handler, lambda ctx: self._directive_gate(client or _peer(ctx),
                                                                      ctx, hold))
        if method == LEASE_CHANNEL:
            return self._lease_guarded(handler, client)
        return handler

    # ----------------------------------------------------------- tokens

    def _authenticate(self, metadata: Any) -> tuple[TokenEntry | None, str]:
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if not values:
            return None, MISSING
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

    def _revocable(self, handler: grpc.RpcMethodHandler, key: CallKey) -> grpc.RpcMethodHandler:
        """``handler`` ended with UNAUTHENTICATED once its token is revoked.
        It runs in a task of its own raced against the revocation; a
        generator handler is turned into one that writes through the context."""
        slot = _handler_slot(handler)
        inner = getattr(handler, slot)
        generator = inspect.isasyncgenfunction(inner)
        calls = self._open

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            revoked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            calls.setdefault(key, set()).add(revoked)
            if generator:
                task = asyncio.ensure_future(_write_all(inner(request, context), context))
            else:
                task = asyncio.ensure_future(inner(request, context))
            try:
                await asyncio.wait((task, revoked), return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "the token of this call was revoked (the credentials "
                                    "were reloaded); call again with a valid token")
            finally:
                if not task.done():
                    task.cancel()
                open_calls = calls.get(key)
                if open_calls is not None:
                    open_calls.discard(revoked)
                    if not open_calls:
                        del calls[key]

        return handler._replace(**{slot: call})

    @contextlib.asynccontextmanager
    async def _as_certificate(
        self, context: grpc.aio.ServicerContext, method: str
    ) -> AsyncIterator[None]:
        """Run as the tenant the peer's (verified) client certificate names."""
        values = (context.auth_context() or {}).get("x509_subject") or []
        subject = values[0].decode(errors="replace") if values else ""
        tenant = self._subjects.get(subject) if subject else None
        if tenant is None:
            named = f"the client certificate's subject {subject!r} names no tenant" if subject \
                else "no client certificate"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"missing credentials and {named}; {method} needs a client "
                                "token as 'authorization: Bearer <token>' call metadata, or a "
                                "client certificate a tenant lists in cert_subjects")
            raise AssertionError("unreachable")
        async with _as_caller(Caller(tenant.name, admin=tenant.admin)):
            yield

    # ----------------------------------------------------------- limits

    @contextlib.asynccontextmanager
    async def _directive_gate(
        self, client: str, context: grpc.aio.ServicerContext, hold: bool
    ) -> AsyncIterator[None]:
        """Publish the gate to the handler; RunDirective (``hold``) takes a slot."""
        slot: DirectiveSlot | None = None
        if hold:
            try:
                slot = self.directive_slots.acquire(client)
            except RouterError as exc:
                await context.abort(grpc.StatusCode[exc.code.value], exc.message)
        token = _DIRECTIVE_GATE.set((self.directive_slots, client))
        try:
            yield
        finally:
            # An async-generator handler closed from another context cannot reset.
            with contextlib.suppress(ValueError):
                _DIRECTIVE_GATE.reset(token)
            if slot is not None:
                slot.release()

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
        open_total = sum(1 for c in channels.values() if not c.directive)
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


async def _write_all(responses: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    async for response in responses:
        await context.write(response)


@contextlib.asynccontextmanager
async def _as_caller(who: Caller) -> AsyncIterator[None]:
    """The handler runs as ``who`` (``_tenants.caller()`` inside it)."""
    token = CALLER.set(who)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # a generator closed from another context
            CALLER.reset(token)


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
