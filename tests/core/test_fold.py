"""FoldState: contiguous-range tree reduction, without any network."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator_service._fold import FoldState


def reduce_with(fold: FoldState, n: int, rng: random.Random, skipped: set[int]) -> tuple[str, int]:
    """Feed leaves in random order, execute combines in random order (string
    concatenation: associative, not commutative). Returns (value, tasks)."""
    order = list(range(n))
    rng.shuffle(order)
    pending = []
    tasks = 0
    for i in order:
        fold.add_leaf(i, None if i in skipped else f"<{i}>".encode())
        pending.extend(fold.schedule())
        while pending and rng.random() < 0.5:
            req = pending.pop(rng.randrange(len(pending)))
            tasks += 1
            fold.combined(req.start, req.end, b"".join(req.operands))
            pending.extend(fold.schedule())
    while pending:
        req = pending.pop(rng.randrange(len(pending)))
        tasks += 1
        fold.combined(req.start, req.end, b"".join(req.operands))
        pending.extend(fold.schedule())
    done, value = fold.result(n)
    assert done
    return ("" if value is None else value.decode()), tasks


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=300),
    seed=st.integers(min_value=0, max_value=2**32),
    max_operands=st.integers(min_value=2, max_value=8),
    skip_ratio=st.sampled_from([0.0, 0.1, 0.9]),
)
def test_fold_equals_left_fold_for_a_non_commutative_monoid(
    n: int, seed: int, max_operands: int, skip_ratio: float
) -> None:
    rng = random.Random(seed)
    skipped = {i for i in range(n) if rng.random() < skip_ratio}
    value, _ = reduce_with(FoldState(max_operands), n, rng, skipped)
    assert value == "".join(f"<{i}>" for i in range(n) if i not in skipped)


def test_only_contiguous_ranges_are_combined() -> None:
    fold = FoldState()
    fold.add_leaf(0, b"a")
    fold.add_leaf(2, b"c")
    assert fold.schedule() == []  # 0 and 2 do not touch
    fold.add_leaf(1, b"b")
    (req,) = fold.schedule()
    assert (req.start, req.end, req.operands) == (0, 3, [b"a", b"b", b"c"])


def test_pairs_are_dispatched_as_soon_as_contiguous_and_runs_are_bounded() -> None:
    fold = FoldState(max_operands=2)
    for i in range(4):
        fold.add_leaf(i, str(i).encode())
    reqs = fold.schedule()
    assert sorted((r.start, r.end) for r in reqs) == [(0, 2), (2, 4)]
    fold.combined(0, 2, b"01")
    assert fold.schedule() == []  # [2,4) still busy
    fold.combined(2, 4, b"23")
    (req,) = fold.schedule()
    assert req.operands == [b"01", b"23"]
    fold.combined(0, 4, b"0123")
    assert fold.result(4) == (True, b"0123")


def test_single_element_needs_no_task_and_empty_input_asks_for_empty() -> None:
    one = FoldState()
    one.add_leaf(0, b"x")
    assert one.schedule() == []
    assert one.result(1) == (True, b"x")
    assert FoldState().result(0) == (True, None)


def test_skipped_elements_merge_without_tasks() -> None:
    fold = FoldState()
    fold.add_leaf(0, None)
    fold.add_leaf(1, b"b")
    fold.add_leaf(2, None)
    assert fold.schedule() == []
    assert fold.result(3) == (True, b"b")


def test_result_waits_for_every_leaf() -> None:
    fold = FoldState()
    fold.add_leaf(0, b"a")
    assert fold.result(2) == (False, None)


def test_misuse_is_refused() -> None:
    fold = FoldState()
    fold.add_leaf(0, b"a")
    with pytest.raises(ValueError, match="twice"):
        fold.add_leaf(0, b"a")
    with pytest.raises(ValueError, match="no combine"):
        fold.combined(0, 1, b"a")
    with pytest.raises(ValueError):
        FoldState(max_operands=1)


def test_in_order_arrival_uses_few_tasks() -> None:
    # Results arriving in order with a batch of 64 need ~n/63 combine tasks,
    # not n-1: one task combines a whole contiguous run.
    fold = FoldState(max_operands=64)
    tasks = 0
    for lo in range(0, 1024, 64):
        for i in range(lo, lo + 64):
            fold.add_leaf(i, b"1")
        for req in fold.schedule():
            tasks += 1
            fold.combined(req.start, req.end, b"1")
        while reqs := fold.schedule():
            for req in reqs:
                tasks += 1
                fold.combined(req.start, req.end, b"1")
    assert fold.result(1024)[0]
    assert tasks < 40
