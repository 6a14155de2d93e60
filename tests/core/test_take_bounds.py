"""Results leave the core in takes bounded in bytes.

Regression: 100 results of 1 MiB each, all ready before the client read,
went out as one 100 MiB ItemBatch (or ResultBatch) and the orchestrator's
write failed with RESOURCE_EXHAUSTED ("Sent message larger than max").
"""

from __future__ import annotations

from orchestrator_service._items import MAX_TAKE_BYTES, Items
from orchestrator_service._model import (
    DirectiveState,
    ErrorInfo,
    MapStage,
    PlanSpec,
    TaskRecord,
)

from .sim import Sim, hello

MIB = 1024 * 1024


def big_output(task: TaskRecord) -> tuple[bytes, ErrorInfo | None]:
    return b'"' + b"x" * (MIB - 2) + b'"', None


def test_directive_items_are_taken_in_bounded_slices() -> None:
    sim = Sim(execute_fn=big_output)
    sim.connect(hello("w", capacity=8, prefetch=8))
    directive = sim.start(PlanSpec(stages=(MapStage("length"),)))
    sim.inputs(directive, [b"1"] * 100)
    sim.end_input(directive)
    sim.run()
    assert directive.state is DirectiveState.DONE

    indices: list[int] = []
    while directive.items:
        take = directive.take_items().outcomes()
        assert take, "a take of pending items came back empty"
        assert sum(len(i.value) for i in take) <= MAX_TAKE_BYTES
        indices.extend(i.index for i in take)
    assert sorted(indices) == list(range(100))
    assert directive.take_items().outcomes() == []


def test_one_item_larger_than_the_bound_still_leaves() -> None:
    sim = Sim(execute_fn=lambda t: (b'"' + b"y" * (MAX_TAKE_BYTES + 10) + b'"', None))
    sim.connect(hello("w"))
    directive = sim.start(PlanSpec(stages=(MapStage("length"),)))
    sim.inputs(directive, [b"1", b"2"])
    sim.end_input(directive)
    sim.run()
    assert [len(directive.take_items().outcomes()) for _ in range(3)] == [1, 1, 0]


def test_channel_results_are_taken_in_bounded_slices() -> None:
    sim = Sim(execute_fn=big_output)
    sim.connect(hello("w", capacity=8, prefetch=8))
    channel = sim.lease()
    sim.publish(channel.id, [TaskRecord("", i, "length", input=b"1") for i in range(100)])
    sim.close(channel.id)
    sim.run()
    ids: list[int] = []
    while channel.results:
        take = sim.take(channel, 1024)
        assert take and sum(len(r.output) for r in take) <= MAX_TAKE_BYTES
        ids.extend(r.task.task_id for r in take)
    assert sorted(ids) == list(range(100))
    assert channel.ended and sim.router.channels[channel.id].unread == 0


def test_a_take_keeps_values_and_skipped_elements_within_the_bound() -> None:
    items = Items()
    for i in range(5):
        items.indexes.append(i)
        items.values.append(b"v" * 40)
        items.nbytes += 40
    items.skipped.append((5, "e" * 30))
    items.nbytes += 30
    takes = []
    while items:
        take = items.take(100)
        assert take and take.nbytes <= 100 and take.nbytes == sum(map(len, take.values)) + sum(
            len(e) for _, e in take.skipped
        )
        takes.append(sorted(o.index for o in take.outcomes()))
    assert takes == [[0, 1], [2, 3], [4, 5]] and items.nbytes == 0
