"""Squire: route distributed tasks and their results.

The public API (everything else is private and may change):

- declare work: :func:`operation`, :func:`monoid`, :class:`Registry`
- failures: :class:`TransientError`, :class:`FatalError`, retry strategies
  :class:`Immediate`, :class:`After`, :class:`Exponential`, :class:`FatalStrategy`
- payloads: :class:`Serializer`
- the exception tree rooted at :class:`SquireError` (see ``squire._errors``)
"""

from __future__ import annotations

from squire._errors import (
    AccessDenied,
    AlreadyExists,
    Cancelled,
    DirectiveFailed,
    FailedPrecondition,
    FatalError,
    InvalidArgument,
    NotFound,
    OperationError,
    PayloadError,
    ResourceExhausted,
    RpcError,
    SquireError,
    TransientError,
    Unavailable,
)
from squire._ops import AbortSignal, Monoid, Operation, Registry, monoid, operation
from squire._retry import After, Exponential, FatalStrategy, Immediate, RetryStrategy
from squire._serde import Serializer

__version__ = "0.1.0"

__all__ = [
    "AbortSignal",
    "AccessDenied",
    "After",
    "AlreadyExists",
    "Cancelled",
    "DirectiveFailed",
    "Exponential",
    "FailedPrecondition",
    "FatalError",
    "FatalStrategy",
    "Immediate",
    "InvalidArgument",
    "Monoid",
    "NotFound",
    "Operation",
    "OperationError",
    "PayloadError",
    "Registry",
    "ResourceExhausted",
    "RetryStrategy",
    "RpcError",
    "Serializer",
    "SquireError",
    "TransientError",
    "Unavailable",
    "__version__",
    "monoid",
    "operation",
]
