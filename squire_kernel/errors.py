"""The exceptions an operation and a payload can raise, shared by the SDK
and both services (the SDK adds the RPC errors below ``SquireError``)::

    SquireError
    ├── OperationError            raised by an operation to steer its failure
    │   ├── TransientError        retried with its RetryStrategy, then fatal
    │   └── FatalError            fails the task with a FatalStrategy
    └── PayloadError              a value cannot be encoded or decoded
"""

from __future__ import annotations

from squire_kernel.retry import FatalStrategy, Immediate, RetryStrategy


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
        super().__init__(message)
        self.retry: RetryStrategy = retry if retry is not None else Immediate(3)


class FatalError(OperationError):
    """A failure that retrying cannot fix.

    ``strategy`` decides what happens to the directive: TERMINATE (default)
    fails it; IGNORE skips the element and goes on.
    """

    def __init__(self, message: str, strategy: FatalStrategy | None = None) -> None:
        super().__init__(message)
        self.strategy: FatalStrategy = strategy if strategy is not None else FatalStrategy.TERMINATE


class PayloadError(SquireError, ValueError):
    """A value cannot be encoded, or bytes cannot be decoded."""
