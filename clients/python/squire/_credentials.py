"""Channels to the orchestrator with TLS and a client token.

``tls_ca``, ``tls_cert`` and ``tls_key`` are PEM data (``bytes``) or paths to
PEM files (``str`` / ``os.PathLike``). A client certificate is needed only
when the orchestrator runs with ``--require-worker-client-cert`` (mTLS on its
one port applies to every peer). The token travels as
``authorization: Bearer <token>`` call metadata on every call, added by an
interceptor, so it works over TLS and over loopback plaintext alike.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from squire_kernel.targets import channel_target

PemSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Credentials:
    """What a client presents: TLS material (PEM bytes) and the token."""

    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(
        cls,
        *,
        tls: bool | None = None,
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | None = None,
    ) -> Credentials:
        """TLS is on when asked (``tls=True``) or when any TLS material is given."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        material = tls_ca is not None or tls_cert is not None
        if tls is False and material:
            raise ValueError("tls=False contradicts tls_ca / tls_cert")
        if token is not None and (not token or any(c.isspace() for c in token)):
            raise ValueError("token must be a non-empty string without whitespace")
        return cls(
            tls=bool(tls) or material,
            root_certificates=_pem(tls_ca, "tls_ca"),
            certificate_chain=_pem(tls_cert, "tls_cert"),
            private_key=_pem(tls_key, "tls_key"),
            token=token,
        )

    @property
    def plain(self) -> bool:
        return not self.tls and self.token is None

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    def channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to ``target`` (several addresses: see squire_kernel.targets)."""
        target, extra = channel_target(target)
        options = [*options, *extra]
        if self.tls:
            channel = grpc.secure_channel(target, self._channel_credentials(), options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, _TokenInterceptor(self._metadata()))

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel to ``target`` (create it inside the running loop)."""
        target, extra = channel_target(target)
        options = [*options, *extra]
        interceptors = (
            None
            if self.token is None
            else [
                _AsyncUnaryUnary(self._metadata()),
                _AsyncUnaryStream(self._metadata()),
                _AsyncStreamUnary(self._metadata()),
                _AsyncStreamStream(self._metadata()),
            ]
        )
        if self.tls:
            return grpc.aio.secure_channel(
                target, self._channel_credentials(), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def _pem(source: PemSource | None, what: str) -> bytes | None:
    if source is None:
        return None
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} is not PEM data (pass bytes, or the path of a PEM file)")
    return data


def _with_metadata(details: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    # Both stacks hand interceptors namedtuples; grpc.aio wants a Metadata.
    if isinstance(details, grpc.aio.ClientCallDetails):
        metadata: Any = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    else:
        metadata = (*(details.metadata or ()), *extra)
    return details._replace(metadata=metadata)


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds the token to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request_iterator)


# grpc.aio tells interceptor kinds apart by their base class, one per kind.

class _AsyncBase:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def _call(self, continuation: Callable[..., Awaitable[Any]], details: Any,
                    request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _AsyncUnaryUnary(_AsyncBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _AsyncUnaryStream(_AsyncBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await self._call(continuation, details, request)


class _AsyncStreamUnary(_AsyncBase, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any,
                                     request_iterator: Any) -> Any:
        return await self._call(continuation, details, request_iterator)


class _AsyncStreamStream(_AsyncBase, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      request_iterator: Any) -> Any:
        return await self._call(continuation, details, request_iterator)


# The services' security settings taken from the environment. Embedded mode
# runs plaintext on loopback without tokens, so its children must not pick
# them up from the caller's environment.
SERVICE_SECURITY_ENV = frozenset({
    "SQUIRE_TLS", "SQUIRE_TLS_CA", "SQUIRE_TLS_CERT", "SQUIRE_TLS_KEY", "SQUIRE_TLS_CLIENT_CA",
    "SQUIRE_REQUIRE_WORKER_CLIENT_CERT", "SQUIRE_INSECURE", "SQUIRE_HEALTH_PORT",
    "SQUIRE_WORKER_TOKEN", "SQUIRE_CLIENT_TOKEN", "SQUIRE_WORKER_TOKEN_FILE",
    "SQUIRE_CLIENT_TOKEN_FILE", "SQUIRE_TOKEN_FILE",
})


def without_security_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in SERVICE_SECURITY_ENV}
