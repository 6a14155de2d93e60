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

gRPC errors become RpcError subclasses in exactly one place,
``squire._client.translate_rpc_error``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squire._retry import FatalStrategy, RetryStrategy


class SquireError(Exception):
    """Base of every exception Squire raises."""


class OperationError(SquireError):
    """Raised inside an operation to say how its failure is handled."""


class TransientError(OperationError):
    """A failure worth retrying (a flaky dependency, a busy resource).

    The worker retries the task following ``retry``; when retries run out the
    failure becomes fatal with ``FatalStrategy.TERMINATE``.
    """

    def __init__(self, message: str, retry: RetryStrategy | None = None) -> None:
        from squire._retry import Immediate

        super().__init__(message)
        self.retry: RetryStrategy = retry if retry is not None else Immediate(3)


class FatalError(OperationError):
    """A failure that retrying cannot fix.

    ``strategy`` decides what happens to the directive: TERMINATE (default)
    fails it; IGNORE skips the element and goes on.
    """

    def __init__(self, message: str, strategy: FatalStrategy | None = None) -> None:
        from squire._retry import FatalStrategy

        super().__init__(message)
        self.strategy: FatalStrategy = strategy if strategy is not None else FatalStrategy.TERMINATE


class PayloadError(SquireError, ValueError):
    """A value cannot be encoded, or bytes cannot be decoded."""


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
