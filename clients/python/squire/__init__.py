"""Squire: route distributed tasks and their results.

The public API (everything else is private and may change):

- declare work: :func:`operation`, :func:`monoid`, :class:`Registry`
- failures: :class:`TransientError`, :class:`FatalError`, retry strategies
  :class:`Immediate`, :class:`After`, :class:`Exponential`, :class:`FatalStrategy`
- payloads: :class:`Serializer`
- the exception tree rooted at :class:`SquireError` (see ``squire._errors``)
- talk to an orchestrator: :class:`Client`, :class:`AsyncClient`
- run directives: :class:`IndexedStream` (``.map(op).fold(monoid)`` then
  ``.run(client)``), whose map results hold :class:`Skipped` for ignored
  failures; for power users :class:`DirectiveRun` / :class:`AsyncDirectiveRun`
  and the :data:`DirectiveEvent` values (:class:`DirectiveStarted`,
  :class:`ItemBatch`, :class:`Progress`, :class:`FoldValue`) they yield
- the low-level channel API: :class:`ChannelHandle`,
  :class:`AsyncChannelHandle`, :class:`TaskOutcome`, :class:`TaskFailure`
- embedded mode: :func:`embedded`, :func:`async_embedded`, :class:`Embedded`
"""

from __future__ import annotations

from squire._async_channel import AsyncChannelHandle
from squire._channel import ChannelHandle
from squire._client import AsyncClient, Client
from squire._directive import AsyncDirectiveRun, DirectiveRun
from squire._embedded import Embedded, async_embedded, embedded
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
from squire._model import (
    DirectiveEvent,
    DirectiveStarted,
    FoldValue,
    ItemBatch,
    Plan,
    Progress,
    Skipped,
    TaskFailure,
    TaskOutcome,
)
from squire._stream import IndexedStream
from squire_kernel import __version__
from squire_kernel.operations import AbortSignal, Monoid, Operation, Registry, monoid, operation
from squire_kernel.retry import After, Exponential, FatalStrategy, Immediate, RetryStrategy
from squire_kernel.serde import Serializer

__all__ = [
    "AbortSignal",
    "AccessDenied",
    "After",
    "AlreadyExists",
    "AsyncChannelHandle",
    "AsyncClient",
    "AsyncDirectiveRun",
    "Cancelled",
    "ChannelHandle",
    "Client",
    "DirectiveEvent",
    "DirectiveFailed",
    "DirectiveRun",
    "DirectiveStarted",
    "Embedded",
    "Exponential",
    "FailedPrecondition",
    "FatalError",
    "FatalStrategy",
    "FoldValue",
    "Immediate",
    "IndexedStream",
    "InvalidArgument",
    "ItemBatch",
    "Monoid",
    "NotFound",
    "Operation",
    "OperationError",
    "PayloadError",
    "Plan",
    "Progress",
    "Registry",
    "ResourceExhausted",
    "RetryStrategy",
    "RpcError",
    "Serializer",
    "Skipped",
    "SquireError",
    "TaskFailure",
    "TaskOutcome",
    "TransientError",
    "Unavailable",
    "__version__",
    "async_embedded",
    "embedded",
    "monoid",
    "operation",
]
