"""What a directive's journal holds, and its encoding (msgpack; no I/O).

A directive journals the calls that change it (``Directive.log``), one
record per call, in order; replaying them into a new Directive rebuilds it
exactly (``_restore``). The router drains the records of one event batch
into one ``Journal`` instruction, and the hub writes them as one store entry
per directive per batch: group commit by construction, never one write per
task. The header of a directive's stream is its plan; its summary, once it
finished, how its call ends.

Records (tuples, built on the hot path):
- ``(INPUTS, items)``: the next input elements;
- ``(RESULTS, task_ids, outputs, errors | None)``: outcomes of its tasks;
- ``(ADVANCE,)``: the directive looked for fold combines and its end;
- ``(END_INPUT,)``, ``(CANCEL,)``, ``(FAIL, code, message)``.

A leased channel (stream kind CHANNEL; its header names its tenant)
journals the same way (``JournalChannel`` instructions), with its own records:
- ``(PUBLISHED, rows)``: tasks it accepted, one ``task_row`` each;
- ``(DELIVERED, task_ids, outputs, errors | None, seconds)``: results, in the
  order they go to the subscriber;
- ``(CLOSED,)``: the sender closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from orchestrator_service._model import (
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    FoldStage,
    MapStage,
    PlanSpec,
    Stage,
    TaskRecord,
)

INPUTS, RESULTS, ADVANCE, END_INPUT, CANCEL, FAIL = 1, 2, 3, 4, 5, 6
PUBLISHED, DELIVERED, CLOSED = 11, 12, 13

Record = tuple[Any, ...]

ENTRY_RECORDS = 1  # the store entry kind of a batch of records

_packer = msgpack.Packer(use_bin_type=True)


def _packb(value: Any) -> bytes:
    packed: bytes = _packer.pack(value)
    return packed


def task_row(task: TaskRecord) -> tuple[Any, ...]:
    """A published task as its channel journals it."""
    return (
        task.task_id, task.operation, task.kind, task.params, task.input,
        list(task.operands), task.serializer, task.metadata, task.timeout_seconds,
    )


def task_from_row(channel_id: str, row: Sequence[Any]) -> TaskRecord:
    task_id, operation, kind, params, input, operands, serializer, metadata, timeout = row
    return TaskRecord(
        channel_id, task_id, operation, kind, params, input, operands, serializer,
        metadata, timeout,
    )


def encode_records(records: Sequence[Record]) -> bytes:
    out: list[Any] = []
    for record in records:
        if record[0] in (RESULTS, DELIVERED) and record[3] is not None:
            errors = [None if e is None else _error_row(e) for e in record[3]]
            out.append((record[0], record[1], record[2], errors, *record[4:]))
        else:
            out.append(record)
    return _packb(out)


def decode_records(payload: bytes) -> list[Record]:
    rows = msgpack.unpackb(payload, raw=False, use_list=True)
    records: list[Record] = []
    for row in rows:
        if row[0] in (RESULTS, DELIVERED) and row[3] is not None:
            row[3] = [None if e is None else _error_from_row(e) for e in row[3]]
        records.append(tuple(row))
    return records


def _error_row(error: ErrorInfo) -> list[Any]:
    return [
        error.error_type, error.message, error.strategy, error.retries_exhausted,
        error.retries, int(error.kind),
    ]


def _error_from_row(row: list[Any]) -> ErrorInfo:
    return ErrorInfo(row[0], row[1], row[2], row[3], row[4], ErrorKind(row[5]))


# ------------------------------------------------------------------- plan


def encode_plan(plan: PlanSpec) -> bytes:
    stages = [
        ("map", s.operation, s.params) if isinstance(s, MapStage) else ("fold", s.monoid, s.params)
        for s in plan.stages
    ]
    return _packb(
        {
            "stages": stages,
            "serializer": plan.serializer,
            "expected_items": plan.expected_items,
            "task_timeout_seconds": plan.task_timeout_seconds,
            "detached": plan.detached,
            "tenant": plan.tenant,
            "priority": plan.priority,
        }
    )


def decode_plan(header: bytes) -> PlanSpec:
    data = msgpack.unpackb(header, raw=False)
    stages: list[Stage] = [
        MapStage(name, params) if kind == "map" else FoldStage(name, params)
        for kind, name, params in data["stages"]
    ]
    return PlanSpec(
        tuple(stages),
        serializer=data["serializer"],
        expected_items=data["expected_items"],
        task_timeout_seconds=data["task_timeout_seconds"],
        detached=data["detached"],
        tenant=data.get("tenant", ""),  # journals written before tenants have none
        priority=data.get("priority", 0),
    )


# ---------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class Summary:
    """How a finished directive's call ends, kept for callers who attach later."""

    state: DirectiveState
    code: Code | None  # None: OK
    message: str
    fold_value: bytes | None
    items: int  # items it emitted in all
    received: int


def encode_summary(summary: Summary) -> bytes:
    return _packb(
        [
            summary.state.value, None if summary.code is None else summary.code.value,
            summary.message, summary.fold_value, summary.items, summary.received,
        ]
    )


def decode_summary(payload: bytes) -> Summary:
    state, code, message, fold_value, items, received = msgpack.unpackb(payload, raw=False)
    return Summary(
        DirectiveState(state), None if code is None else Code(code), message, fold_value,
        items, received,
    )


# ------------------------------------------------------------ channel header


def encode_channel_header(tenant: str) -> bytes:
    return _packb({"tenant": tenant}) if tenant else b""


def decode_channel_header(header: bytes) -> str:
    """The channel's tenant ("" for none, or a header written before tenants)."""
    if not header:
        return ""
    tenant: str = msgpack.unpackb(header, raw=False).get("tenant", "")
    return tenant
