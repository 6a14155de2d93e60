"""Transport security, tokens and limits of the orchestrator: configuration,
credential loading, the plaintext-listen check and the command-line flags.

The request-time checks (token roles, per-client limits) live in
``_interceptor``; this module only decides what they are configured with.

One port serves workers and clients. TLS can only be negotiated per port,
before any role is known, so ``--require-worker-client-cert`` makes *every*
peer of the port present a certificate signed by ``--tls-client-ca``:
workers and SDK clients alike. Roles are told apart by their tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from orchestrator_service._model import RouterConfig
from orchestrator_service._tenants import Tenants, load_tenants
from squire_kernel.flags import port_number

log = logging.getLogger("squire.orchestrator")

MIN_TOKEN_LENGTH = 16
_TRUE = frozenset({"1", "true", "yes", "on"})


class Role(enum.Enum):
    WORKER = "worker"
    CLIENT = "client"


class SecurityConfigError(ValueError):
    """The security flags contradict each other or a credential is unusable."""


class InsecureListenError(SecurityConfigError):
    """Plaintext on a non-loopback address without ``--insecure``."""


@dataclass(frozen=True)
class TokenEntry:
    """One accepted token, kept as its SHA-256 digest (never as the secret)."""

    role: Role
    label: str  # "client token #2": safe to log, names the client for limits
    digest: bytes = field(repr=False)
    # With a tenants file: the tenant a client token names (None: a
    # --client-token-file token, an operator's), and whether it is an operator.
    tenant: str | None = None
    admin: bool = False


def digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


@dataclass(frozen=True)
class SecurityConfig:
    """TLS material (file paths) and the accepted tokens of both roles.

    No TLS and no tokens (the default) is the loopback/development mode.
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    require_worker_client_cert: bool = False
    insecure: bool = False  # allow plaintext on a non-loopback address
    worker_tokens: tuple[str, ...] = field(default=(), repr=False)
    client_tokens: tuple[str, ...] = field(default=(), repr=False)
    tenants: Tenants | None = None  # --tenants: client identities (``_tenants``)
    # Where the credentials came from, so they can be read again (``reload``).
    worker_token_file: str | None = None
    client_token_file: str | None = None
    tenants_file: str | None = None
    worker_token_env: str = field(default="", repr=False)
    client_token_env: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.require_worker_client_cert and not (self.tls and self.tls_client_ca):
            raise SecurityConfigError(
                "--require-worker-client-cert needs --tls-cert, --tls-key and --tls-client-ca "
                "(the CA that signs the workers' client certificates)"
            )
        if self.tls_client_ca and not self.require_worker_client_cert:
            raise SecurityConfigError(
                "--tls-client-ca has no effect without --require-worker-client-cert"
            )
        for role, tokens in ((Role.WORKER, self.worker_tokens), (Role.CLIENT, self.client_tokens)):
            for position, token in enumerate(tokens, 1):
                if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                    raise SecurityConfigError(
                        f"{role.value} token #{position} is unusable: tokens need at least "
                        f"{MIN_TOKEN_LENGTH} characters and no whitespace"
                    )
        if set(self.worker_tokens) & set(self.client_tokens):
            raise SecurityConfigError(
                "a token is configured for both roles; worker and client tokens must differ"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def auth(self) -> bool:
        """Token authentication is on when any token or tenant is configured."""
        return bool(self.worker_tokens or self.client_tokens or self.tenants)

    def token_entries(self) -> tuple[TokenEntry, ...]:
        plain = tuple(
            TokenEntry(role, f"{role.value} token #{position}", digest(token),
                       admin=self.tenants is not None and role is Role.CLIENT)
            for role, tokens in ((Role.WORKER, self.worker_tokens),
                                 (Role.CLIENT, self.client_tokens))
            for position, token in enumerate(tokens, 1)
        )
        if self.tenants is None:
            return plain
        return plain + tuple(
            TokenEntry(Role.CLIENT, f"tenant {t.name}", d, tenant=t.name, admin=t.admin)
            for t in self.tenants.by_name.values()
            for d in t.digests
        )


@dataclass(frozen=True)
class Limits:
    """Per-client and overall limits the interceptor enforces.

    A client is its token when tokens are configured, else its peer's host.
    """

    max_directives: int = 1_024
    max_directives_per_client: int = 256
    max_channels: int = 4_096
    max_channels_per_client: int = 1_024

    def __post_init__(self) -> None:
        for name in ("max_directives", "max_directives_per_client",
                     "max_channels", "max_channels_per_client"):
            if getattr(self, name) < 1:
                raise SecurityConfigError(f"{name} must be at least 1")


# ---------------------------------------------------------------- loading

def parse_tokens(text: str) -> tuple[str, ...]:
    """One token per line (several allow rotation); blank lines and #-comments skipped."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def load_tokens(value: str | None, path: str | None) -> tuple[str, ...]:
    """The tokens from an environment value and/or a file (a Kubernetes Secret)."""
    tokens = parse_tokens(value or "")
    if path:
        tokens += parse_tokens(Path(path).read_text())
    return tuple(dict.fromkeys(tokens))  # de-duplicated, order kept


def _read_pem(path: str, what: str) -> bytes:
    data = Path(path).read_bytes()
    if b"-----BEGIN" not in data:
        raise SecurityConfigError(f"{what} {path!r} holds no PEM data")
    return data


class CertificateFiles:
    """The port's certificate, key and client CA, read again when one of the
    files changes: gRPC asks before it accepts each new connection (existing
    connections keep the certificate they were made with). A change that
    does not load (a half-written file, a key that does not match) keeps
    the previous certificate and is logged."""

    def __init__(self, config: SecurityConfig) -> None:
        assert config.tls_cert is not None and config.tls_key is not None
        self._paths = [config.tls_cert, config.tls_key]
        if config.require_worker_client_cert:
            assert config.tls_client_ca is not None
            self._paths.append(config.tls_client_ca)
        self._seen = self._signature()
        self.loaded = self._load()  # raises at start-up: a bad file stops the start
        self.reloads = 0

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self._paths:
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read_pem(self._paths[1], "--tls-key"), _read_pem(self._paths[0], "--tls-cert"))
        roots = _read_pem(self._paths[2], "--tls-client-ca") if len(self._paths) > 2 else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None."""
        now = self._signature()
        if now == self._seen:
            return None
        self._seen = now
        try:
            self.loaded = self._load()
        except (OSError, SecurityConfigError) as exc:
            log.error("TLS certificate not reloaded, the old one stays: %s", exc)
            return None
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"files": self._paths})
        return self.loaded


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials:
    files = CertificateFiles(config)
    return grpc.dynamic_ssl_server_credentials(
        files.loaded, files.fetch, require_client_authentication=config.require_worker_client_cert,
    )


def is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name or "" (every interface): assume reachable


def check_listen(host: str, config: SecurityConfig, *, announce: bool = True) -> None:
    """Refuse plaintext outside loopback unless --insecure; log what is (not)
    protected, unless ``announce`` is false (then :func:`announce_protection`
    does, once the port is bound: a start that fails says only why)."""
    if not config.tls and not is_loopback(host) and not config.insecure:
        raise InsecureListenError(
            f"refusing to listen in plaintext on {host!r}, which is not a loopback "
            "address: give --tls-cert and --tls-key, or --insecure to accept plaintext "
            "(e.g. behind a mesh that encrypts traffic)"
        )
    if announce:
        announce_protection(host, config)


def announce_protection(host: str, config: SecurityConfig) -> None:
    """Log what is (not) protected: TLS, tokens, plaintext beyond loopback."""
    loopback = is_loopback(host)
    if not config.tls and not loopback:
        log.warning(
            "listening in plaintext on a non-loopback address (--insecure): traffic, "
            "task payloads and tokens cross the network unencrypted",
            extra={"host": host},
        )
    if config.tls:
        log.info(
            "TLS on%s",
            "; every peer must present a client certificate signed by --tls-client-ca"
            if config.require_worker_client_cert else "",
        )
    if not config.auth:
        (log.info if loopback else log.warning)(
            "token authentication is off (no worker or client tokens configured): "
            "any peer that reaches the port may join as a worker or publish tasks"
        )
        return
    log.info(
        "token authentication on",
        extra={"worker_tokens": len(config.worker_tokens),
               "client_tokens": len(config.client_tokens),
               "tenants": len(config.tenants.by_name) if config.tenants else 0},
    )
    clients = config.client_tokens or (config.tenants.by_name if config.tenants else ())
    for role, tokens in ((Role.WORKER, config.worker_tokens), (Role.CLIENT, clients)):
        if not tokens:
            log.warning(
                "no %s tokens configured: every %s call will be refused", role.value, role.value
            )


# ------------------------------------------------------------------ flags

Env = Callable[[str, str], str]


def _flag(value: str) -> bool:
    return value.strip().lower() in _TRUE


def add_arguments(p: argparse.ArgumentParser, env: Env) -> None:
    """The security and limit flags of ``squire-orchestrator``."""
    limits = Limits()
    g = p.add_argument_group("security (see docs/SECURITY.md)")
    g.add_argument("--tls-cert", default=env("tls_cert", "") or None,
                   help="PEM certificate (chain) of the gRPC port; enables TLS")
    g.add_argument("--tls-key", default=env("tls_key", "") or None,
                   help="PEM private key for --tls-cert")
    g.add_argument("--tls-client-ca", default=env("tls_client_ca", "") or None,
                   help="PEM CA that signs client certificates (with --require-worker-client-cert)")
    g.add_argument("--require-worker-client-cert", action="store_true",
                   default=_flag(env("require_worker_client_cert", "")),
                   help="mTLS: every peer of the port (workers and clients) must present a "
                   "certificate signed by --tls-client-ca")
    g.add_argument("--insecure", action="store_true", default=_flag(env("insecure", "")),
                   help="allow plaintext on a non-loopback --host (refused otherwise)")
    g.add_argument("--worker-token-file", default=env("worker_token_file", "") or None,
                   help="file of accepted worker tokens, one per line "
                   "(also $SQUIRE_WORKER_TOKEN)")
    g.add_argument("--client-token-file", default=env("client_token_file", "") or None,
                   help="file of accepted client tokens, one per line "
                   "(also $SQUIRE_CLIENT_TOKEN)")
    g.add_argument("--tenants", default=env("tenants", "") or None,
                   help="TOML file of tenants: client identities by token digest, weights "
                   "and quotas (docs/SECURITY.md); a --client-token-file token is then an "
                   "operator's")
    g.add_argument("--health-port", type=port_number, default=env("health_port", "0"),
                   help="also serve grpc.health.v1 alone, in plaintext, on this port "
                   "(for Kubernetes gRPC probes when the main port uses TLS); 0 = off")
    g = p.add_argument_group("limits (exceeding one answers RESOURCE_EXHAUSTED)")
    g.add_argument("--max-message-bytes", type=int,
                   default=env("max_message_bytes", str(64 * 1024 * 1024)),
                   help="largest gRPC message received or sent (default %(default)s)")
    g.add_argument("--max-pending-per-channel", type=int,
                   default=env("max_pending_per_channel",
                               str(RouterConfig().max_pending_per_channel)),
                   help="tasks of one channel without a taken result (queued, running, "
                   "unread); publishing past this fails (default %(default)s)")
    for name, what in (
        ("max_directives", "directives running at once, over all clients"),
        ("max_directives_per_client", "directives one client runs at once"),
        ("max_channels", "leased channels open at once, over all clients"),
        ("max_channels_per_client", "leased channels one client holds at once"),
    ):
        g.add_argument(f"--{name.replace('_', '-')}", type=int,
                       default=env(name, str(getattr(limits, name))),
                       help=f"{what} (default %(default)s)")


def security_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ,
                       ) -> SecurityConfig:
    return reload(SecurityConfig(
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        require_worker_client_cert=args.require_worker_client_cert,
        insecure=args.insecure,
        worker_token_file=args.worker_token_file,
        client_token_file=args.client_token_file,
        tenants_file=args.tenants,
        worker_token_env=environ.get("SQUIRE_WORKER_TOKEN", ""),
        client_token_env=environ.get("SQUIRE_CLIENT_TOKEN", ""),
    ))


def reload(config: SecurityConfig) -> SecurityConfig:
    """``config`` with its token files and tenants file read again (raises
    what reading or parsing them raises; the caller keeps the old one then)."""
    if not (config.worker_token_file or config.client_token_file or config.tenants_file
            or config.worker_token_env or config.client_token_env):
        return config
    def tokens(env: str, path: str | None, given: tuple[str, ...]) -> tuple[str, ...]:
        return load_tokens(env, path) if env or path else given  # given: no source to re-read

    return dataclasses.replace(
        config,
        worker_tokens=tokens(config.worker_token_env, config.worker_token_file,
                             config.worker_tokens),
        client_tokens=tokens(config.client_token_env, config.client_token_file,
                             config.client_tokens),
        tenants=load_tenants(config.tenants_file) if config.tenants_file else config.tenants,
    )


def credential_files(config: SecurityConfig) -> tuple[str, ...]:
    """The files whose change reloads the credentials."""
    return tuple(p for p in (config.worker_token_file, config.client_token_file,
                             config.tenants_file) if p)


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        max_directives=args.max_directives,
        max_directives_per_client=args.max_directives_per_client,
        max_channels=args.max_channels,
        max_channels_per_client=args.max_channels_per_client,
    )
