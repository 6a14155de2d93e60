"""Results on their way to their caller: a directive's as columns, a
channel's taken in bounded slices.

The values of finished elements by index, and the skipped elements with
their errors. Columns, not one object per element: a batch of results is
appended with two ``extend`` calls (see bench/README.md). The order between
values and skipped elements is not kept; results are emitted in completion
order tagged with their index anyway.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from orchestrator_service._model import ChannelResult

# Results leave in takes of at most this many payload bytes (one larger
# result goes alone), so no message built from one take nears the 64 MiB
# gRPC limit however big the outputs are.
MAX_TAKE_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class ItemOutcome:
    """One element's result as the caller sees it (see :meth:`Items.outcomes`)."""

    index: int
    value: bytes
    skipped: bool = False
    error: str = ""


class Items:
    __slots__ = ("indexes", "nbytes", "skipped", "values")

    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.values: list[bytes] = []
        self.skipped: list[tuple[int, str]] = []  # (index, error)
        self.nbytes = 0  # payload bytes held: values and errors

    def __len__(self) -> int:
        return len(self.indexes) + len(self.skipped)

    def outcomes(self) -> list[ItemOutcome]:
        """One object per element, for tests and tools (not the hot path)."""
        out = [ItemOutcome(i, v) for i, v in zip(self.indexes, self.values, strict=True)]
        out.extend(ItemOutcome(i, b"", skipped=True, error=e) for i, e in self.skipped)
        return out

    def extend(self, other: Items) -> None:
        self.indexes.extend(other.indexes)
        self.values.extend(other.values)
        self.skipped.extend(other.skipped)
        self.nbytes += other.nbytes

    def take(self, max_bytes: int = MAX_TAKE_BYTES) -> Items:
        """Everything held, or as much as fits ``max_bytes`` (at least one element)."""
        taken = Items()
        if self.nbytes <= max_bytes:  # the usual case: no per-element work
            taken.indexes, self.indexes = self.indexes, []
            taken.values, self.values = self.values, []
            taken.skipped, self.skipped = self.skipped, []
            taken.nbytes, self.nbytes = self.nbytes, 0
            return taken
        size = values = skipped = 0
        for value in self.values:
            if size + len(value) > max_bytes and values:
                break
            size += len(value)
            values += 1
        if values == len(self.values):
            for _, error in self.skipped:
                if size + len(error) > max_bytes and (values or skipped):
                    break
                size += len(error)
                skipped += 1
        taken.indexes, self.indexes = self.indexes[:values], self.indexes[values:]
        taken.values, self.values = self.values[:values], self.values[values:]
        taken.skipped, self.skipped = self.skipped[:skipped], self.skipped[skipped:]
        taken.nbytes = size
        self.nbytes -= size
        return taken


def take_bounded(
    results: deque[ChannelResult], limit: int, max_bytes: int = MAX_TAKE_BYTES
) -> list[ChannelResult]:
    """Up to ``limit`` channel results and ``max_bytes`` of outputs (one larger goes alone)."""
    out: list[ChannelResult] = []
    size = 0
    while results and len(out) < limit:
        size += len(results[0].output)
        if size > max_bytes and out:
            break
        out.append(results.popleft())
    return out
