"""Rebuilding a directive from its journal (pure; no I/O).

A directive's journal is the calls that changed it, in order (see
``_journal_records``). Replaying them into a new :class:`Directive` gives
the same directive: the same task ids, fold ranges, counters and the same
items in the same order, because a Directive is a pure function of its
plan and its calls. The tasks that were created and have no outcome in the
journal are what must run again; the items are what was emitted before.
"""

from __future__ import annotations

from collections.abc import Iterable

from orchestrator_service._directive import Directive
from orchestrator_service._items import Items
from orchestrator_service._journal_records import (
    ADVANCE,
    CANCEL,
    END_INPUT,
    FAIL,
    INPUTS,
    RESULTS,
    Record,
)
from orchestrator_service._model import Code, PlanSpec, TaskRecord


def replay(
    directive_id: str,
    plan: PlanSpec,
    records: Iterable[Record],
    *,
    max_fold_operands: int,
    now: float,
) -> tuple[Directive, dict[int, TaskRecord], Items]:
    """The directive its journal describes, its tasks without an outcome (by
    task id), and every item it emitted, in emission order."""
    directive = Directive(directive_id, plan, max_fold_operands=max_fold_operands, now=now)
    outstanding: dict[int, TaskRecord] = {}
    items = Items()
    for record in records:
        kind = record[0]
        if kind == INPUTS:
            for task in directive.add_inputs(record[1], now):
                outstanding[task.task_id] = task
        elif kind == RESULTS:
            tasks = [outstanding.pop(task_id) for task_id in record[1]]
            for task in directive.on_results(tasks, record[2], record[3], now):
                outstanding[task.task_id] = task
        elif kind == ADVANCE:
            for task in directive.advance(now):
                outstanding[task.task_id] = task
        elif kind == END_INPUT:
            directive.end_input()
        elif kind == CANCEL:
            directive.cancel()
        elif kind == FAIL:
            directive.fail(Code(record[1]), record[2])
        else:
            raise ValueError(f"directive {directive_id}: unknown journal record {kind!r}")
        if directive.items:
            items.extend(directive.items)
            directive.items = Items()
    directive.emitted = len(items)
    directive.credited = directive.completed
    return directive, outstanding, items
