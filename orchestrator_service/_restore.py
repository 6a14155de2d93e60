"""Rebuilding a directive or a leased channel from its journal (pure; no I/O).

A directive's journal is the calls that changed it, in order (see
``_journal_records``). Replaying them into a new :class:`Directive` gives
the same directive: the same task ids, fold ranges, counters and the same
items in the same order, because a Directive is a pure function of its
plan and its calls. The tasks that were created and have no outcome in the
journal are what must run again; the items are what was emitted before.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from orchestrator_service._directive import Directive
from orchestrator_service._items import Items
from orchestrator_service._journal_records import (
    ADVANCE,
    CANCEL,
    CLOSED,
    DELIVERED,
    END_INPUT,
    FAIL,
    INPUTS,
    PUBLISHED,
    RESULTS,
    Record,
    task_from_row,
)
from orchestrator_service._model import ChannelResult, Code, ErrorInfo, PlanSpec, TaskRecord


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


@dataclass(slots=True)
class ChannelReplay:
    """A leased channel as its journal describes it."""

    ids: set[int] = field(default_factory=set)  # every task id it accepted
    outstanding: dict[int, TaskRecord] = field(default_factory=dict)  # no result yet, by id
    delivered: int = 0  # results, in all
    closed: bool = False


def replay_channel(
    channel_id: str, records: Iterable[Record], *, keep_results: bool = False
) -> tuple[ChannelReplay, list[ChannelResult]]:
    """The channel its journal describes and, with ``keep_results``, every
    result it delivered, in delivery order (what a resubscribing subscriber
    may lack)."""
    state = ChannelReplay()
    results: list[ChannelResult] = []
    for record in records:
        kind = record[0]
        if kind == PUBLISHED:
            for row in record[1]:
                task = task_from_row(channel_id, row)
                state.ids.add(task.task_id)
                state.outstanding[task.task_id] = task
        elif kind == DELIVERED:
            task_ids, outputs, errors, seconds = record[1], record[2], record[3], record[4]
            state.delivered += len(task_ids)
            for position, task_id in enumerate(task_ids):
                task = state.outstanding.pop(task_id)
                if keep_results:
                    error: ErrorInfo | None = errors[position] if errors is not None else None
                    results.append(
                        ChannelResult(task, outputs[position], error, seconds[position])
                    )
        elif kind == CLOSED:
            state.closed = True
        else:
            raise ValueError(f"channel {channel_id}: unknown journal record {kind!r}")
    return state, results
