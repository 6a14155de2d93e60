"""The client's hot path for map results: gathered by index.

IndexedStream.run decodes item events straight into a list by index
(``_Collector.gather``) instead of building ItemBatch pairs; these tests pin
that it gives exactly what gathering the pairs in a dict gave: later results
win, skipped elements, decode errors naming the element, and the same
completeness errors for missing, duplicate and out-of-range indices.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from squire import IndexedStream, PayloadError, Skipped, SquireError
from squire._model import ItemBatch
from squire._stream import _Collector
from squire._wire import Tally, directive_event
from squire.api.v1 import squire_pb2 as pb

from squire_kernel.serde import Serializer, encode

MAP = IndexedStream.from_iterable([]).map("fib_at")


def _result(index: int, value: Any = None, *, skipped: bool = False) -> pb.IndexedResult:
    if skipped:
        return pb.IndexedResult(index=index, skipped=True, error=f"ValueError: {index}")
    return pb.IndexedResult(index=index, value=encode(value))


def _event(items: list[pb.IndexedResult]) -> pb.DirectiveEvent:
    return pb.DirectiveEvent(items=pb.ItemBatch(items=items))


def _gathered(events: list[pb.DirectiveEvent], inputs_sent: int) -> Any:
    collector = _Collector(MAP.plan())
    for event in events:
        assert directive_event(event, Serializer.JSON, collector.gather) is None
    return collector.result(inputs_sent)


def _reference(events: list[pb.DirectiveEvent], inputs_sent: int) -> Any:
    """What the SDK did before gathering by index: ItemBatch pairs into a dict."""
    values: dict[int, Any] = {}
    for event in events:
        batch = directive_event(event, Serializer.JSON)
        assert isinstance(batch, ItemBatch)
        values.update(batch.items)
    if len(values) == inputs_sent and all(0 <= i < inputs_sent for i in values):
        return [values[i] for i in range(inputs_sent)]
    missing = sorted(set(range(inputs_sent)) - set(values))
    raise SquireError(
        f"the directive ended with {len(values)} results for {inputs_sent} inputs"
        + (f"; missing indices {missing[:10]}" if missing else "")
    )


def _outcome(gather: Any, events: list[pb.DirectiveEvent], inputs_sent: int) -> Any:
    try:
        return gather(events, inputs_sent)
    except SquireError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("seed", range(40))
def test_gathering_by_index_gives_what_the_pairs_gave(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([0, 1, 5, 300, 3000, 12_000])
    indices = list(range(n))
    rng.shuffle(indices)
    if rng.random() < 0.5:
        indices.sort(reverse=True)  # the last inputs first: indices far past the list
    if n and rng.random() < 0.5:  # duplicates, possibly far ahead and again later
        indices += rng.choices(range(n), k=rng.randint(1, 20))
    if n and rng.random() < 0.3:  # lost results
        for _ in range(rng.randint(1, 3)):
            indices.pop(rng.randrange(len(indices)))
    if rng.random() < 0.3:  # results for inputs never sent
        indices.insert(rng.randrange(len(indices) + 1), n + rng.choice([0, 1, 10**6, 2**63]))
    skipped = set(rng.sample(range(n), k=min(n, 5)))
    results = [
        _result(i, skipped=True) if i in skipped else _result(i, [i, rng.random()])
        for i in indices
    ]
    size = rng.choice([1, 7, 256, 1024])
    events = [_event(results[lo : lo + size]) for lo in range(0, len(results), size)]

    assert _outcome(_gathered, events, n) == _outcome(_reference, events, n)


def test_a_later_result_for_an_index_wins() -> None:
    events = [_event([_result(1, "a"), _result(0, "b")]), _event([_result(1, "c")])]
    assert _gathered(events, 2) == ["b", "c"]
    # Also when the first one came far ahead of the others.
    far = 10**6
    events = [_event([_result(far, "old")]), _event([_result(i, i) for i in range(far)])]
    events.append(_event([_result(far, "new")]))
    assert _gathered(events, far + 1)[far] == "new"


def test_completeness_errors() -> None:
    with pytest.raises(SquireError, match=r"^the directive ended with 2 results for 3 inputs; "
                                          r"missing indices \[1\]$"):
        _gathered([_event([_result(0, 0), _result(2, 2)])], 3)
    with pytest.raises(SquireError, match=r"^the directive ended with 3 results for 2 inputs$"):
        _gathered([_event([_result(0, 0), _result(1, 1), _result(9, 9)])], 2)
    with pytest.raises(SquireError, match=r"2 results for 3 inputs; missing indices \[2\]"):
        _gathered([_event([_result(0, 0), _result(1, 1), _result(1, 1)])], 3)


def test_skipped_elements_and_values_that_look_falsy() -> None:
    events = [_event([_result(0, 0), _result(1, skipped=True), _result(2, ""), _result(3, None)])]
    assert _gathered(events, 4) == [0, Skipped(1, "ValueError: 1"), "", None]


@pytest.mark.parametrize("value", [b"{nope", b""], ids=["invalid", "empty"])
def test_a_bad_result_is_a_payload_error_naming_the_element(value: bytes) -> None:
    events = [_event([_result(0, 0), pb.IndexedResult(index=7, value=value)])]
    with pytest.raises(PayloadError, match=r"^result 7 is not valid JSON"):
        _gathered(events, 8)
    with pytest.raises(PayloadError, match=r"^result 7 is not valid JSON"):
        directive_event(events[0], Serializer.JSON)  # the ItemBatch path too


def test_item_batches_keep_completion_order() -> None:
    event = _event([_result(2, "c"), _result(0, "a"), _result(1, skipped=True)])
    assert directive_event(event, Serializer.JSON) == ItemBatch(
        ((2, "c"), (0, "a"), (1, Skipped(1, "ValueError: 1")))
    )


def test_the_tally_counts_values_and_skipped_elements_on_both_paths() -> None:
    """What a reattach tells the orchestrator it has."""
    event = _event([_result(0, "a"), _result(1, skipped=True), _result(2, ""), _result(3, None)])
    batches, gathered = Tally(), Tally()
    directive_event(event, Serializer.JSON, tally=batches)
    collector = _Collector(MAP.plan())
    directive_event(event, Serializer.JSON, collector.gather, gathered)
    assert batches == gathered == Tally(values=3, skipped=1)
