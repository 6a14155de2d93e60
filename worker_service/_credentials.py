"""How a worker proves itself to the orchestrator: TLS (optionally with a
client certificate, for ``--require-worker-client-cert``) and a worker token
sent as ``authorization: Bearer <token>`` on the worker stream.

Files are read again on every connection attempt, so certificates and tokens
mounted from Kubernetes Secrets can rotate without restarting the worker.
The token is never logged.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from squire_kernel.targets import channel_target
from worker_service._config import WorkerConfig

Metadata = tuple[tuple[str, str], ...]


class CredentialsError(ValueError):
    """A TLS file or the token cannot be used."""


def _read_pem(path: str, what: str) -> bytes:
    data = Path(path).read_bytes()
    if b"-----BEGIN" not in data:
        raise CredentialsError(f"{what} {path!r} holds no PEM data")
    return data


def read_token(config: WorkerConfig) -> str | None:
    token = config.token
    if config.token_file:
        lines = [line.strip() for line in Path(config.token_file).read_text().splitlines()]
        tokens = [line for line in lines if line and not line.startswith("#")]
        if len(tokens) != 1:
            raise CredentialsError(
                f"--token-file {config.token_file!r} must hold exactly one token, "
                f"found {len(tokens)}"
            )
        token = tokens[0]
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise CredentialsError("the worker token is empty or contains whitespace")
    return token


def call_metadata(config: WorkerConfig) -> Metadata:
    token = read_token(config)
    return () if token is None else (("authorization", f"Bearer {token}"),)


def open_channel(config: WorkerConfig, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to the orchestrator: one address, or its replicas
    ``h1:p1,h2:p2``, following the leader (see squire_kernel.targets)."""
    target, extra = channel_target(config.orchestrator)
    options = [*options, *extra]
    if not config.uses_tls:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(config.tls_ca, "--tls-ca") if config.tls_ca else None,
        private_key=_read_pem(config.tls_key, "--tls-key") if config.tls_key else None,
        certificate_chain=_read_pem(config.tls_cert, "--tls-cert") if config.tls_cert else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def check(config: WorkerConfig) -> None:
    """Read every configured file once, so a typo fails at start-up, not per reconnect."""
    try:
        call_metadata(config)
        for path, what in ((config.tls_ca, "--tls-ca"), (config.tls_cert, "--tls-cert"),
                           (config.tls_key, "--tls-key")):
            if path:
                _read_pem(path, what)
    except OSError as exc:
        raise CredentialsError(f"cannot read {exc.filename!r}: {exc.strerror}") from exc


# ------------------------------------------------------------------ flags

Env = Callable[[str], "str | None"]
_TRUE = frozenset({"1", "true", "yes", "on"})


def add_arguments(parser: argparse.ArgumentParser, env: Env) -> None:
    g = parser.add_argument_group("security (see docs/SECURITY.md)")
    g.add_argument("--tls", action="store_true",
                   default=(env("TLS") or "").strip().lower() in _TRUE,
                   help="connect with TLS, trusting the system's root certificates "
                   "(implied by --tls-ca and --tls-cert)")
    g.add_argument("--tls-ca", default=env("TLS_CA"),
                   help="PEM CA that signed the orchestrator's certificate; enables TLS")
    g.add_argument("--tls-cert", default=env("TLS_CERT"),
                   help="PEM client certificate, for an orchestrator that requires one")
    g.add_argument("--tls-key", default=env("TLS_KEY"), help="PEM private key for --tls-cert")
    g.add_argument("--token-file", default=env("TOKEN_FILE"),
                   help="file holding this worker's token (also $SQUIRE_WORKER_TOKEN)")


def config_fields(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        "tls": args.tls,
        "tls_ca": args.tls_ca or None,
        "tls_cert": args.tls_cert or None,
        "tls_key": args.tls_key or None,
        "token_file": args.token_file or None,
        "token": None if args.token_file else environ.get("SQUIRE_WORKER_TOKEN") or None,
    }
