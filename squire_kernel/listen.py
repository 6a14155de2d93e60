"""Why a service cannot listen on a port, in one line a person can act on.

Both services bind several ports (gRPC, /metrics, health); when one is taken
the error names the port and the flag that moves it, instead of a bare
``[Errno 98] Address already in use`` or gRPC's "Failed to bind".
"""

from __future__ import annotations

import errno
import ipaddress
import socket


class ListenError(OSError):
    """A service cannot listen on a port; the message names the port and its flag."""


def listen_error(
    host: str, port: int, flag: str, cause: BaseException | None = None
) -> ListenError:
    """The error for ``host:port`` (set by ``flag``) that could not be bound."""
    env = "SQUIRE_" + flag.lstrip("-").replace("-", "_").upper()
    return ListenError(
        f"cannot listen on {host}:{port}: {_reason(host, port, cause)}; "
        f"choose another port with {flag} (or {env})"
    )


def check_free(host: str, port: int, flag: str) -> None:
    """Raise the ListenError for ``host:port`` if it cannot be bound now.

    For gRPC ports, before the server tries: grpcio's own failure is a C-core
    log line on stderr and a RuntimeError without the reason. Only an IP
    address is checked (a host name is left to the server); port 0 is always
    free.
    """
    if port == 0:
        return
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return
    error = _bind_error(host.strip("[]"), port)
    if error is not None:
        raise listen_error(host, port, flag, error)


def _bind_error(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As servers bind: connections in TIME_WAIT do not block the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return exc
    return None


def _reason(host: str, port: int, cause: BaseException | None) -> str:
    code = cause.errno if isinstance(cause, OSError) else None
    if code is None:
        # gRPC says only "Failed to bind": binding the address here tells why.
        error = _bind_error(host.strip("[]"), port)
        if error is None:
            return "the server could not bind it"
        code, cause = error.errno, error
    if code == errno.EADDRINUSE:
        return f"port {port} is already in use"
    if code == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine"
    if code == errno.EACCES:
        return f"permission denied for port {port} (ports below 1024 need privileges)"
    return str(getattr(cause, "strerror", None) or cause)
