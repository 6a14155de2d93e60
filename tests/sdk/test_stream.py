"""IndexedStream: building plans, and running them through a blocking Client."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import msgpack
import pytest
from squire import (
    Client,
    DirectiveFailed,
    DirectiveStarted,
    FailedPrecondition,
    FoldValue,
    IndexedStream,
    ItemBatch,
    PayloadError,
    Progress,
    ResourceExhausted,
    Serializer,
    Skipped,
)
from squire._model import FoldStage, MapStage
from squire.api.v1 import squire_pb2 as pb

from .fake_orchestrator import FakeServer
from .polling import wait_for

FIB_1_TO_10 = [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]


# ---------------------------------------------------------------- building


def test_each_builder_call_returns_a_new_stream() -> None:
    base = IndexedStream.from_iterable([1, 2, 3])
    mapped = base.map("fib_at")
    doubled = mapped.map("multiply_by", factor=2)
    folded = doubled.fold("sum")

    assert base.plan().stages == ()
    assert mapped.plan().stages == (MapStage("fib_at", {}),)
    assert doubled.plan().stages == (MapStage("fib_at", {}), MapStage("multiply_by", {"factor": 2}))
    assert folded.plan().stages[-1] == FoldStage("sum", {})
    assert folded.describe() == "map(fib_at) -> map(multiply_by, factor=2) -> fold(sum)"


@pytest.mark.parametrize("after_fold", ["map", "fold"])
def test_nothing_can_follow_a_fold(after_fold: str) -> None:
    folded = IndexedStream.from_iterable([1]).fold("sum")
    with pytest.raises(ValueError, match="fold must be the last stage"):
        getattr(folded, after_fold)("fib_at")


def test_operation_names_must_be_non_empty() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IndexedStream.from_iterable([1]).map("")


def test_expected_items_comes_from_len_or_the_total_hint() -> None:
    assert IndexedStream.from_iterable([1, 2, 3]).plan().expected_items == 3
    assert IndexedStream.from_iterable(iter([1, 2])).plan().expected_items is None
    assert IndexedStream.from_iterable(iter([1, 2]), total=2).plan().expected_items == 2


def test_serializer_names_are_parsed() -> None:
    stream = IndexedStream.from_iterable([1])
    assert stream.plan("msgpack").serializer is Serializer.MSGPACK
    with pytest.raises(ValueError, match="unknown serializer"):
        stream.plan("pickle")


# ---------------------------------------------------------- on the wire


def test_the_plan_goes_first_with_stages_params_and_serializer(
    client: Client, fake: FakeServer
) -> None:
    stream = (
        IndexedStream.from_iterable(range(1, 11))
        .map("fib_at")
        .map("multiply_by", factor=2)
        .fold("sum")
        .with_task_timeout(5.0)
    )
    assert stream.run(client) == 2 * sum(FIB_1_TO_10)

    (plan,) = fake.servicer.plans
    assert [s.WhichOneof("kind") for s in plan.stages] == ["map", "map", "fold"]
    assert plan.stages[0].map.operation == "fib_at"
    assert plan.stages[0].map.params == b""  # no parameters: empty bytes
    assert plan.stages[1].map.operation == "multiply_by"
    assert plan.stages[1].map.params == b'{"factor":2}'
    assert plan.stages[2].fold.monoid == "sum"
    assert plan.stages[2].fold.params == b""
    assert plan.serializer == pb.SERIALIZER_JSON
    assert plan.expected_items == 10
    assert plan.task_timeout_seconds == 5.0


def test_msgpack_round_trip(client: Client, fake: FakeServer) -> None:
    big = 2**40
    stream = IndexedStream.from_iterable([big, -3, 0]).map("multiply_by", factor=3)
    assert stream.run(client, serializer="msgpack") == [3 * big, -9, 0]

    (plan,) = fake.servicer.plans
    assert plan.serializer == pb.SERIALIZER_MSGPACK
    assert msgpack.unpackb(plan.stages[0].map.params) == {"factor": 3}

    words = IndexedStream.from_iterable(["ça", "🦀", "z"]).fold("concat")
    assert words.run(client, serializer=Serializer.MSGPACK) == "ça🦀z"


def test_inputs_are_sent_in_batches_of_at_most_256(client: Client, fake: FakeServer) -> None:
    IndexedStream.from_iterable(range(600)).map("fib_at").run(client)
    assert fake.servicer.batch_sizes == [256, 256, 88]


# ------------------------------------------------------------- results


def test_map_results_come_back_in_input_order(client: Client) -> None:
    # The fake reports every batch in reverse: collecting must sort by index.
    result = IndexedStream.from_iterable(range(600)).map("multiply_by", factor=2).run(client)
    assert result == [2 * i for i in range(600)]


def test_iter_yields_in_completion_order(client: Client) -> None:
    pairs = list(IndexedStream.from_iterable(range(1, 11)).map("fib_at").iter(client))
    assert pairs == [(i, FIB_1_TO_10[i]) for i in reversed(range(10))]


def test_fold_gives_one_value(client: Client) -> None:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
    assert stream.run(client) == 143


def test_empty_input(client: Client) -> None:
    assert IndexedStream.from_iterable([]).map("fib_at").run(client) == []
    assert IndexedStream.from_iterable([]).fold("multiply").run(client) == 1  # empty()


def test_skipped_elements_stand_at_their_index(client: Client, fake: FakeServer) -> None:
    fake.servicer.script.skip_indices = {1, 3}
    stream = IndexedStream.from_iterable(range(1, 6)).map("fib_at")

    assert stream.run(client) == [
        1,
        Skipped(1, "ValueError: skip 1"),
        2,
        Skipped(3, "ValueError: skip 3"),
        5,
    ]
    assert dict(stream.iter(client))[3] == Skipped(3, "ValueError: skip 3")


def test_iter_refuses_a_fold_plan_before_starting(client: Client, fake: FakeServer) -> None:
    with pytest.raises(ValueError, match="fold"):
        IndexedStream.from_iterable([1]).fold("sum").iter(client)
    assert fake.servicer.plans == []


def test_events_expose_the_directive_and_its_progress(client: Client) -> None:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
    with stream.events(client) as run:
        events = list(run)
    assert events[0] == DirectiveStarted("directive-1")
    assert isinstance(events[-1], FoldValue) and events[-1].value == 143
    assert not any(isinstance(e, ItemBatch) for e in events)  # a fold reports no items
    assert run.directive_id == "directive-1"
    assert run.progress == Progress(received=10, completed=10, total=10, tasks_done=10)
    assert run.inputs_sent == 10


# -------------------------------------------------------------- failures


def test_a_fatal_operation_error_fails_the_directive(client: Client, fake: FakeServer) -> None:
    fake.servicer.script.fail_index = 2
    with pytest.raises(DirectiveFailed) as info:
        IndexedStream.from_iterable(range(5)).map("fib_at").run(client)
    assert info.value.code == "ABORTED"
    assert str(info.value).startswith("Fatal operation error: ValueError: scripted failure")


def test_an_unknown_operation_is_a_failed_precondition(client: Client) -> None:
    with pytest.raises(FailedPrecondition, match="no worker offers operation 'nope'"):
        IndexedStream.from_iterable([1]).map("nope").run(client)


def test_an_error_in_the_input_iterable_is_raised_as_is(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    def inputs() -> Iterator[int]:
        yield from range(300)
        raise RuntimeError("the input broke")

    with caplog.at_level(logging.DEBUG), pytest.raises(RuntimeError, match="the input broke"):
        IndexedStream.from_iterable(inputs()).map("fib_at").run(client)
    # Cancelled quietly, not reported by gRPC as an "Exception iterating requests!".
    assert "Exception iterating requests" not in caplog.text


def test_an_unencodable_input_is_a_payload_error(client: Client) -> None:
    with pytest.raises(PayloadError, match="cannot encode object"):
        IndexedStream.from_iterable([1, object()]).map("fib_at").run(client)


# --------------------------------------------------------- lazy streaming


def test_results_flow_back_before_the_input_ends(client: Client) -> None:
    first_result = threading.Event()
    consumed = 0

    def inputs() -> Iterator[int]:
        nonlocal consumed
        for i in range(20_000):
            if i == 1000:
                # Hold the input open until a result arrived: a client that
                # read the whole input before sending would never see one.
                assert first_result.wait(timeout=20), "no result while the input was open"
            consumed += 1
            yield i

    results = IndexedStream.from_iterable(inputs()).map("multiply_by", factor=1).iter(client)
    first = next(results)
    consumed_at_first_result = consumed
    first_result.set()
    rest = list(results)

    assert consumed_at_first_result <= 1000
    assert sorted([first, *rest]) == [(i, i) for i in range(20_000)]


def test_a_million_element_generator_is_not_materialized(client: Client, fake: FakeServer) -> None:
    # The fake reads two batches, then ends the call without reading more.
    fake.servicer.script.abort_after_batches = (2, grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
    consumed = 0

    def inputs() -> Iterator[int]:
        nonlocal consumed
        for i in range(1_000_000):
            consumed += 1
            yield i

    with pytest.raises(ResourceExhausted, match="enough"):
        IndexedStream.from_iterable(inputs()).map("fib_at").run(client)
    assert 512 <= consumed < 500_000


def test_breaking_out_of_iter_cancels_the_directive(client: Client, fake: FakeServer) -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    results = IndexedStream.from_iterable(endless()).map("fib_at").iter(client)
    for _ in results:
        break
    results.close()  # what leaving a for loop over a dropped generator does
    wait_for(lambda: fake.servicer.cancelled_directives == ["directive-1"], what="cancellation")
