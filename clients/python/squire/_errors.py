"""Squire's exceptions, one tree for the whole package::

    SquireError
    ├── OperationError            raised by an operation to steer its failure
    │   ├── TransientError        retried with its RetryStrategy, then fatal
    │   └── FatalError            fails the task with a FatalStrategy
    ├── PayloadError              a value cannot be encoded or decoded
    └── RpcError                  a call to the orchestrator failed (has .code)
        ├── InvalidArgument       INVALID_ARGUMENT: bad plan, payload, serializer
        ├── NotFound              NOT_FOUND: unknown channel id
        ├── AlreadyExists         ALREADY_EXISTS: e.g. duplicate worker id
        ├── FailedPrecondition    FAILED_PRECONDITION: wrong state, no worker offers an operation
        ├── ResourceExhausted     RESOURCE_EXHAUSTED: a limit was hit
        ├── Unavailable           UNAVAILABLE: orchestrator down or shutting down
        ├── DirectiveFailed       ABORTED: an operation failed fatally (Terminate)
        ├── Cancelled             CANCELLED / DEADLINE_EXCEEDED
        └── AccessDenied          UNAUTHENTICATED / PERMISSION_DENIED

The first four live in :mod:`squire_kernel.errors` (workers raise them too)
and are re-exported here. gRPC errors become RpcError subclasses in exactly
one place, :func:`translate_rpc_error`.
"""

from __future__ import annotations

import grpc

from squire_kernel.errors import (
    FatalError,
    OperationError,
    PayloadError,
    SquireError,
    TransientError,
)

__all__ = [
    "AccessDenied",
    "AlreadyExists",
    "Cancelled",
    "DirectiveFailed",
    "FailedPrecondition",
    "FatalError",
    "InvalidArgument",
    "NotFound",
    "OperationError",
    "PayloadError",
    "ResourceExhausted",
    "RpcError",
    "SquireError",
    "TransientError",
    "Unavailable",
    "rpc_error",
    "translate_rpc_error",
]


class RpcError(SquireError):
    """A call to the orchestrator failed; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidArgument(RpcError):
    pass


class NotFound(RpcError):
    pass


class AlreadyExists(RpcError):
    pass


class FailedPrecondition(RpcError):
    pass


class ResourceExhausted(RpcError):
    pass


class Unavailable(RpcError):
    pass


class DirectiveFailed(RpcError):
    """The directive failed: an operation raised a fatal (Terminate) error."""


class Cancelled(RpcError):
    pass


class AccessDenied(RpcError):
    pass


_ERROR_BY_CODE: dict[str, type[RpcError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "ABORTED": DirectiveFailed,
    "CANCELLED": Cancelled,
    "DEADLINE_EXCEEDED": Cancelled,
    "UNAUTHENTICATED": AccessDenied,
    "PERMISSION_DENIED": AccessDenied,
}


def translate_rpc_error(exc: grpc.RpcError) -> RpcError:
    """The squire exception for a failed gRPC call; use as ``raise ... from exc``.

    ``.code`` keeps the status name (e.g. ``"ABORTED"``) and the message is
    the status details. Codes without a dedicated class (UNKNOWN, INTERNAL,
    UNIMPLEMENTED, ...) give a plain :class:`RpcError`.
    """
    # grpc.RpcError itself has no accessors; the raised objects are also grpc.Call.
    code_of = getattr(exc, "code", None)
    status = code_of() if callable(code_of) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    details_of = getattr(exc, "details", None)
    details = details_of() if callable(details_of) else None
    message = details or f"the orchestrator answered {name} without details"
    return rpc_error(name, message)


def rpc_error(name: str, message: str) -> RpcError:
    """The squire exception for a gRPC status ``name`` (e.g. ``"ABORTED"``)."""
    return _ERROR_BY_CODE.get(name, RpcError)(message, name)
