"""Input elements encoded into InputBatch requests: the cut, the count, the laziness."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from squire import PayloadError
from squire._wire import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, InputBatcher

from squire_kernel.serde import Serializer, decode


class _Source:
    """An iterator that counts how often it was asked for an element."""

    def __init__(self, values: list[Any]) -> None:
        self._values = iter(values)
        self.asked = 0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self.asked += 1
        return next(self._values)


def _batches(batcher: InputBatcher, source: Any) -> list[list[bytes]]:
    return [list(request.inputs.items) for request in batcher.requests(source)]


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 600])
def test_inputs_are_cut_every_256_and_the_source_asked_once_past_its_end(n: int) -> None:
    assert MAX_BATCH_ITEMS == 256
    batcher = InputBatcher(Serializer.JSON)
    source = _Source(list(range(n)))
    batches = _batches(batcher, source)
    assert [len(b) for b in batches] == [256] * (n // 256) + ([n % 256] if n % 256 else [])
    assert [decode(item) for b in batches for item in b] == list(range(n))
    assert batcher.count == n
    assert source.asked == n + 1  # like a for loop: one StopIteration, no more


def test_inputs_are_cut_at_a_mebibyte_and_pulled_no_further_than_the_batch() -> None:
    big = "x" * (MAX_BATCH_BYTES // 4)  # with its quotes, the fourth one reaches the limit
    batcher = InputBatcher(Serializer.JSON)
    source = _Source([big] * 10)
    requests = batcher.requests(source)
    first = next(requests)
    assert len(first.inputs.items) == 4
    assert source.asked == 4 and batcher.count == 4  # counted before it is sent
    assert [len(r.inputs.items) for r in requests] == [4, 2]
    assert batcher.count == 10


def test_an_input_that_fails_to_encode_leaves_the_count_at_the_ones_before() -> None:
    batcher = InputBatcher(Serializer.JSON)
    requests = batcher.requests([*range(300), object()])
    assert len(next(requests).inputs.items) == 256
    with pytest.raises(PayloadError, match="cannot encode object"):
        next(requests)
    assert batcher.count == 300
