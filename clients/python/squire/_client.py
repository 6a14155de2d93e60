"""Clients of the orchestrator: :class:`Client` (blocking) and :class:`AsyncClient`.

Every call the SDK makes starts from one of these two classes (directive runs
and channel handles get their stubs from them), and every gRPC error becomes
a :class:`squire.RpcError` subclass in one place, :func:`squire._errors.translate_rpc_error`.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import AsyncIterable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio

from squire._async_channel import AsyncChannelHandle, AsyncLease
from squire._channel import ChannelHandle
from squire._credentials import Credentials, PemSource
from squire._directive import AsyncDirectiveRun, DirectiveRun
from squire._errors import SquireError, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT
from squire._model import Plan
from squire._session import SESSION_MAX_ITEMS, DirectiveSession, SessionRun
from squire._wire import ItemSink, status_dict
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """64 MiB message limits both ways (payloads may be large), then ``extra``."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
    options.update(extra)
    return list(options.items())


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def _client_target(target: str | None, channel: object | None) -> str:
    if target is None and channel is None:
        raise ValueError("pass the orchestrator's address, e.g. Client('127.0.0.1:50051')")
    if target is not None and channel is not None:
        raise ValueError("pass either a target such as '127.0.0.1:50051' or a channel, not both")
    return target if target is not None else "<injected channel>"


class Client:
    """A blocking client of the orchestrator at ``target`` (``host:port``; or
    ``"h1:p1,h2:p2"``, the replicas of one orchestrator on a shared store:
    calls go to the leader and follow it on a failover).

    Pass ``channel`` instead of ``target`` to use a channel you own (for
    example ``grpc_testing.channel(...)`` in tests); :meth:`close` leaves an
    injected channel open. Safe to share between threads.

    Security (see docs/SECURITY.md): ``tls_ca`` (the CA of the orchestrator's
    certificate; ``tls=True`` alone trusts the system roots), ``tls_cert`` and
    ``tls_key`` (a client certificate, when the orchestrator requires one),
    each PEM bytes or a file path; ``token``, a client token sent with every call.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
        session: bool = True,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.target = _client_target(target, channel)
        # A running directive or leased channel whose orchestrator goes away
        # (a restart, a failover) is reattached for this long before its
        # call fails.
        self.reattach_timeout = reattach_timeout
        # Small directives ride one shared RunDirectives stream (squire._session);
        # session=False gives every directive its own RunDirective call.
        self._use_session = session
        credentials = Credentials.resolve(
            tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token
        )
        if channel is not None and not credentials.plain:
            raise ValueError("an injected channel carries its own credentials; "
                             "pass tls_* and token only with a target")
        self._owns_channel = channel is None
        self._channel = (
            channel
            if channel is not None
            else credentials.channel(self.target, channel_options(options))
        )
        self._directives = pb_grpc.DirectiveServiceStub(self._channel)
        self._channels = pb_grpc.ChannelServiceStub(self._channel)
        self._status = pb_grpc.StatusServiceStub(self._channel)
        self._session: DirectiveSession | None = None
        self._session_lock = threading.Lock()
        self._state = _State.OPEN

    def status_proto(self, *, timeout: float | None = 10.0) -> pb.GetStatusResponse:
        """The orchestrator's GetStatusResponse as the proto message."""
        self._check_open()
        try:
            response: pb.GetStatusResponse = self._status.GetStatus(
                pb.GetStatusRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return response

    def status(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """Workers, queues, channels and directives as plain data (proto field names)."""
        return status_dict(self.status_proto(timeout=timeout))

    def run_directive(self, plan: Plan, inputs: Iterable[Any]) -> DirectiveRun | SessionRun:
        """Start a directive; iterate the returned run for its events.

        ``inputs`` is consumed lazily, as gRPC flow control lets the elements
        through. A short list, tuple or range (``SESSION_MAX_ITEMS``) rides
        the client's shared session stream instead of a call of its own
        (``squire._session``). :class:`squire.IndexedStream` is the friendlier
        way to call this.
        """
        return self._run_directive(plan, inputs)

    def _run_directive(
        self, plan: Plan, inputs: Iterable[Any], items_to: ItemSink | None = None
    ) -> DirectiveRun | SessionRun:
        # IndexedStream.run passes ``items_to`` to gather map results itself.
        self._check_open()
        if isinstance(inputs, AsyncIterable) and not isinstance(inputs, Iterable):
            raise TypeError("Client needs a plain iterable; use AsyncClient for async iterables")

        if (
            self._use_session
            and isinstance(inputs, list | tuple | range)
            and len(inputs) <= SESSION_MAX_ITEMS
        ):
            with self._session_lock:
                if self._session is None:
                    self._session = DirectiveSession(self._directives)
            return SessionRun(
                self._session, plan, inputs, items_to=items_to,
                reattach_timeout=self.reattach_timeout,
            )
        return DirectiveRun(
            self._directives, plan, inputs, items_to=items_to,
            reattach_timeout=self.reattach_timeout,
        )

    def attach(self, directive_id: str) -> DirectiveRun:
        """Attach to a directive accepted earlier (a detached one, see
        :meth:`IndexedStream.submit`, or one whose caller went away) and
        stream its events from the start: its items, progress, the fold
        value, the end. Needs an orchestrator with a journal."""
        self._check_open()
        return DirectiveRun.attach(
            self._directives, directive_id, reattach_timeout=self.reattach_timeout
        )

    def directives(self, *, timeout: float | None = 10.0) -> list[dict[str, Any]]:
        """The directives the orchestrator holds, running and finished-unread,
        as plain data (DirectiveInfo field names)."""
        self._check_open()
        try:
            response = self._directives.ListDirectives(
                pb.ListDirectivesRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return [
            {field.name: value for field, value in d.ListFields()} | {
                "directive_id": d.directive_id, "state": d.state,
            }
            for d in response.directives
        ]

    def cancel(self, directive_id: str, *, timeout: float | None = 10.0) -> None:
        """Cancel a directive by id (a finished one is dropped with its results)."""
        self._check_open()
        try:
            self._directives.CancelDirective(
                pb.CancelDirectiveRequest(directive_id=directive_id), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc

    def lease_channel(self, *, serializer: str | Serializer = "json") -> ChannelHandle:
        """Lease a fresh result channel; see :class:`ChannelHandle` for its life cycle."""
        self._check_open()

        try:
            response = self._channels.LeaseChannel(pb.LeaseChannelRequest())
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return ChannelHandle(
            self._channels, response.channel_id, Serializer.parse(serializer),
            reattach_timeout=self.reattach_timeout,
        )

    def close(self) -> None:
        """Close the channel (unless it was injected). Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._session is not None:
            self._session.close()
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r}, state={self._state.value})"

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise SquireError(f"{self!r} is closed; create a new client")


class AsyncClient:
    """The asyncio twin of :class:`Client`; create it inside a running event loop.

    Unary and server-streaming calls use ``grpc.aio``. The two client-streaming
    calls (RunDirective, Publish) run on the blocking gRPC stack in threads,
    over a second connection, because ``grpc.aio`` can report a wrong status
    for them (see ``squire._bridge``); their results are awaited on the loop.
    Security parameters as for :class:`Client`.
    """

    def __init__(
        self,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.target = target
        self.reattach_timeout = reattach_timeout
        credentials = Credentials.resolve(
            tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token
        )
        self._channel = credentials.aio_channel(target, channel_options(options))
        self._blocking_channel = credentials.channel(target, channel_options(options))
        # The stubs' overloads pick the async flavour only when grpc is typed.
        self._channels = cast(
            "pb_grpc.ChannelServiceAsyncStub", pb_grpc.ChannelServiceStub(self._channel)
        )
        self._status = cast(
            "pb_grpc.StatusServiceAsyncStub", pb_grpc.StatusServiceStub(self._channel)
        )
        self._blocking_directives = pb_grpc.DirectiveServiceStub(self._blocking_channel)
        self._blocking_channels = pb_grpc.ChannelServiceStub(self._blocking_channel)
        self._state = _State.OPEN

    # `timeout` is the gRPC deadline, which the orchestrator sees too, and
    # mirrors Client; asyncio.timeout() around the call works as well.
    async def status_proto(
        self,
        *,
        timeout: float | None = 10.0,  # noqa: ASYNC109
    ) -> pb.GetStatusResponse:
        """The orchestrator's GetStatusResponse as the proto message."""
        self._check_open()
        try:
            response: pb.GetStatusResponse = await self._status.GetStatus(
                pb.GetStatusRequest(), timeout=timeout
            )
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return response

    async def status(
        self,
        *,
        timeout: float | None = 10.0,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        """Workers, queues, channels and directives as plain data (proto field names)."""
        return status_dict(await self.status_proto(timeout=timeout))

    def run_directive(
        self, plan: Plan, inputs: Iterable[Any] | AsyncIterable[Any]
    ) -> AsyncDirectiveRun:
        """Start a directive; ``async for`` over the returned run for its events."""
        return self._run_directive(plan, inputs)

    def _run_directive(
        self,
        plan: Plan,
        inputs: Iterable[Any] | AsyncIterable[Any],
        items_to: ItemSink | None = None,
    ) -> AsyncDirectiveRun:
        # IndexedStream.run_async passes ``items_to`` to gather map results itself.
        self._check_open()

        return AsyncDirectiveRun(
            self._blocking_directives, plan, inputs, items_to=items_to,
            reattach_timeout=self.reattach_timeout,
        )

    def lease_channel(self, *, serializer: str | Serializer = "json") -> AsyncLease:
        """Lease a result channel: ``await`` it, or use ``async with`` to release on exit."""
        self._check_open()

        parsed = Serializer.parse(serializer)
        return AsyncLease(lambda: self._lease(parsed))

    async def _lease(self, serializer: Serializer) -> AsyncChannelHandle:

        try:
            response = await self._channels.LeaseChannel(pb.LeaseChannelRequest())
        except grpc.RpcError as exc:
            raise translate_rpc_error(exc) from exc
        return AsyncChannelHandle(
            self._channels, self._blocking_channels, response.channel_id, serializer,
            reattach_timeout=self.reattach_timeout,
        )

    async def close(self) -> None:
        """Close the connections, cancelling their calls. Idempotent."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._blocking_channel.close()
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r}, state={self._state.value})"

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise SquireError(f"{self!r} is closed; create a new client")
