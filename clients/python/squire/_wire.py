"""The edge between proto messages and the SDK's plain values. No I/O.

Everything that builds a request or reads a response goes through here, so
the rest of the SDK handles :mod:`squire._model` values only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeAlias

from google.protobuf import json_format

from squire._errors import PayloadError
from squire._model import (
    DirectiveEvent,
    DirectiveStarted,
    FoldValue,
    ItemBatch,
    MapStage,
    Plan,
    Progress,
    Skipped,
    TaskFailure,
    TaskOutcome,
)
from squire.api.v1 import squire_pb2 as pb
from squire_kernel.retry import FatalStrategy
from squire_kernel.serde import Serializer, decode, encode

# An input batch is cut at whichever limit comes first: small messages keep
# latency low, bounded ones keep a single message far below the 64 MiB limit.
MAX_BATCH_ITEMS = 256
MAX_BATCH_BYTES = 1024 * 1024


def encode_params(params: Mapping[str, Any], serializer: Serializer) -> bytes:
    """Keyword parameters as an encoded mapping; no parameters are empty bytes."""
    return encode(dict(params), serializer) if params else b""


def plan_request(plan: Plan) -> pb.DirectiveRequest:
    stages = []
    for stage in plan.stages:
        params = encode_params(stage.params, plan.serializer)
        if isinstance(stage, MapStage):
            stages.append(pb.Stage(map=pb.MapStage(operation=stage.operation, params=params)))
        else:
            stages.append(pb.Stage(fold=pb.FoldStage(monoid=stage.monoid, params=params)))
    return pb.DirectiveRequest(
        plan=pb.Plan(
            stages=stages,
            serializer=pb.Serializer.ValueType(plan.serializer),
            expected_items=plan.expected_items or 0,
            task_timeout_seconds=plan.task_timeout or 0.0,
            detached=plan.detached,
            priority=plan.priority,
        )
    )


def inputs_request(items: list[bytes]) -> pb.DirectiveRequest:
    request = pb.DirectiveRequest()
    request.inputs.items.extend(items)  # in place: no copy of an InputBatch
    return request


class InputBatcher:
    """Encodes input elements into InputBatch requests.

    ``count`` is the number of elements encoded so far; it is raised once per
    batch, before the batch is sent, so every index a result can carry is
    below it.
    """

    def __init__(self, serializer: Serializer) -> None:
        self._serializer = serializer
        self.count = 0

    def requests(self, inputs: Iterable[Any]) -> Iterator[pb.DirectiveRequest]:
        """The input requests for ``inputs``, which are pulled one at a time and
        no further than the batch being filled (gRPC pulls the requests as flow
        control allows)."""
        serializer = self._serializer
        source = iter(inputs)
        while True:
            # The hot loop of the input side: no call but encode per element.
            items: list[bytes] = []
            append = items.append
            size = 0
            try:
                for value in islice(source, MAX_BATCH_ITEMS):
                    data = encode(value, serializer)
                    append(data)
                    size += len(data)
                    if size >= MAX_BATCH_BYTES:
                        break
            finally:
                self.count += len(items)  # also when an element fails to encode
            if items:
                yield inputs_request(items)
            if len(items) < MAX_BATCH_ITEMS and size < MAX_BATCH_BYTES:
                return  # the source is exhausted: it is not asked again


# Where IndexedStream.run has item events decoded: straight into its results
# (see gather_items) rather than into ItemBatch events.
# Gathers an item event's results; returns how many of them were skipped.
ItemSink: TypeAlias = Callable[[Sequence[pb.IndexedResult]], int]


@dataclass(slots=True)
class Tally:
    """Items a call has received: values, and skipped elements (what a
    reattach tells the orchestrator it has)."""

    values: int = 0
    skipped: int = 0


def _items(
    items: Iterable[pb.IndexedResult], serializer: Serializer
) -> tuple[list[tuple[int, Any]], int]:
    # One decode per element, and the error message's wording is built only
    # when a decode fails. `skipped` is read only for an empty value: see
    # gather_items. Returns the items and how many were skipped.
    out: list[tuple[int, Any]] = []
    append = out.append
    skipped = 0
    for item in items:
        value = item.value
        if value:
            try:
                append((item.index, decode(value, serializer)))
            except PayloadError:
                decode(value, serializer, what=f"result {item.index}")  # raises, naming it
                raise
        else:
            append((item.index, _empty_result(item, serializer)))
            skipped += 1
    return out, skipped


def gather_items(
    items: Iterable[pb.IndexedResult],
    serializer: Serializer,
    values: list[Any],
    overflow: Callable[[int, Any], None],
) -> int:
    """Decode ``items`` into ``values`` by index: ``values[index] = value``;
    returns how many were skipped.

    An index past the end of ``values`` goes to ``overflow(index, value)``.
    This is the client's hot path for a gathered map: it reads each field of
    an item once and builds no object per element but the value itself.
    """
    skipped = 0
    for item in items:
        value = item.value
        # The orchestrator sends a skipped element without a value, and any
        # other with a non-empty one (no encoded JSON or MessagePack value is
        # empty), so `skipped` need only be read for an empty value.
        if value:
            try:
                value = decode(value, serializer)
            except PayloadError:
                decode(value, serializer, what=f"result {item.index}")  # raises, naming it
                raise
        else:
            value = _empty_result(item, serializer)  # a Skipped, or it raises
            skipped += 1
        try:
            values[item.index] = value
        except IndexError:
            overflow(item.index, value)
    return skipped


def _empty_result(item: pb.IndexedResult, serializer: Serializer) -> Any:
    if item.skipped:
        return Skipped(item.index, item.error)
    # No serializer accepts empty bytes: this raises, naming the element.
    return decode(b"", serializer, what=f"result {item.index}")


def directive_event(
    message: pb.DirectiveEvent,
    serializer: Serializer,
    items_to: ItemSink | None = None,
    tally: Tally | None = None,
) -> DirectiveEvent | None:
    """Decode one event; None for an event kind this SDK does not know yet.

    With ``items_to``, an item event is handed to it (which decodes the
    items) and gives None too. ``tally`` counts the items received.
    """
    kind = message.WhichOneof("kind")
    if kind == "items":
        batch = message.items.items
        event: ItemBatch | None = None
        if items_to is not None:
            skipped = items_to(batch)
        else:
            items, skipped = _items(batch, serializer)
            event = ItemBatch(tuple(items))
        if tally is not None:
            tally.skipped += skipped
            tally.values += len(batch) - skipped
        return event
    if kind == "progress":
        return progress(message.progress)
    if kind == "started":
        return DirectiveStarted(message.started.directive_id)
    if kind == "fold":
        return FoldValue(decode(message.fold.value, serializer, what="fold value"))
    return None


def progress(message: pb.Progress) -> Progress:
    return Progress(
        received=message.received,
        completed=message.completed,
        skipped=message.skipped,
        total=message.total,
        queued=message.queued,
        leased=message.leased,
        waiting=message.waiting,
        retries=message.retries,
        tasks_done=message.tasks_done,
    )


def task_outcome(result: pb.TaskResult, serializer: Serializer) -> TaskOutcome:
    error = None
    value = None
    if result.WhichOneof("outcome") == "err":
        err = result.err
        error = TaskFailure(
            error_type=err.error_type,
            message=err.message,
            kind=_error_kind(err.kind),
            strategy=(
                FatalStrategy.IGNORE
                if err.strategy == pb.FATAL_STRATEGY_IGNORE
                else FatalStrategy.TERMINATE
            ),
            retries_exhausted=err.retries_exhausted,
            retries=err.retries,
        )
    else:
        value = decode(result.ok.output, serializer, what=f"output of task {result.task_id}")
    return TaskOutcome(
        task_id=result.task_id,
        metadata=result.metadata,
        value=value,
        error=error,
        attempt=result.attempt,
        execution_seconds=result.execution_seconds,
    )


def _error_kind(value: int) -> str:
    try:
        return pb.ErrorKind.Name(pb.ErrorKind.ValueType(value)).removeprefix("ERROR_KIND_").lower()
    except ValueError:  # a kind added to the contract after this SDK
        return f"unknown({value})"


def task_spec(
    *,
    task_id: int,
    operation: str,
    serializer: Serializer,
    params: Mapping[str, Any] | None,
    metadata: bytes,
    input: Any = None,
    operands: list[Any] | None = None,
) -> pb.TaskSpec:
    """An APPLY task, or a COMBINE task when ``operands`` is given."""
    spec = pb.TaskSpec(
        task_id=task_id,
        operation=operation,
        params=encode_params(params or {}, serializer),
        serializer=pb.Serializer.ValueType(serializer),
        metadata=metadata,
    )
    if operands is None:
        spec.kind = pb.TASK_KIND_APPLY
        spec.input = encode(input, serializer)
    else:
        spec.kind = pb.TASK_KIND_COMBINE
        spec.operands.extend(encode(value, serializer) for value in operands)
    return spec


def status_dict(message: pb.GetStatusResponse) -> dict[str, Any]:
    """GetStatusResponse as plain JSON-able data, proto field names, zeros included."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        # uint64 counters as numbers, not the strings ProtoJSON prescribes.
        unquote_int64_if_possible=True,
    )
