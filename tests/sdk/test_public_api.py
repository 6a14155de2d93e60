"""The public API is small and deliberate: every name in squire.__all__ is chosen."""

from __future__ import annotations

import squire

EXPECTED = [
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


def test_all_is_the_curated_list() -> None:
    assert squire.__all__ == EXPECTED


def test_all_is_sorted_and_importable() -> None:
    assert squire.__all__ == sorted(squire.__all__)
    for name in squire.__all__:
        assert hasattr(squire, name), name


def test_translation_stays_private() -> None:
    assert "translate_rpc_error" not in squire.__all__
    from squire._errors import translate_rpc_error

    assert callable(translate_rpc_error)
