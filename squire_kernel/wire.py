"""Wire helpers both services share: proto messages built from the plain
values of either side. The generated wire types are :mod:`squire.api.v1`
(the proto package, ``proto/squire/api/v1/squire.proto``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

from squire.api.v1 import squire_pb2 as pb


class ErrorFields(Protocol):
    """What an ExecutionErr carries: the worker's Failure, the orchestrator's ErrorInfo."""

    @property
    def error_type(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def strategy(self) -> int: ...
    @property
    def retries_exhausted(self) -> bool: ...
    @property
    def retries(self) -> int: ...
    @property
    def kind(self) -> int: ...


def fill_execution_err(err: pb.ExecutionErr, error: ErrorFields) -> None:
    """Set ``err`` in place (both services build results with ``add()``)."""
    err.error_type = error.error_type
    err.message = error.message
    err.strategy = pb.FatalStrategy.ValueType(error.strategy)
    err.retries_exhausted = error.retries_exhausted
    err.retries = error.retries
    err.kind = pb.ErrorKind.ValueType(error.kind)


def task_digest(
    kind: int, operation: str, params: bytes, input: bytes, operands: Sequence[bytes]
) -> int:
    """A task's computation as 64 bits: what a worker names, in its hello, a
    task it still holds from an earlier stream. An orchestrator adopts that
    task's result only for a task of its own with the same digest, so a task
    id reused for another computation (a fold combine regrouped after a
    restart) is never mistaken for it."""
    h = hashlib.blake2b(digest_size=8)
    for part in (operation.encode(), params, input, *operands):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    h.update(bytes((kind,)))
    return int.from_bytes(h.digest(), "little")
