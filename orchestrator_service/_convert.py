"""Translation between wire messages and the core's plain values: the only
module of the orchestrator that knows both."""

from __future__ import annotations

from collections.abc import Callable

from squire.api.v1 import squire_pb2 as pb

from orchestrator_service._events import EndCall, IpcMessage, WorkerResult
from orchestrator_service._items import Items
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    ChannelResult,
    Code,
    ErrorInfo,
    ErrorKind,
    FoldStage,
    HeldTask,
    MapStage,
    PlanSpec,
    ProgressSnapshot,
    RouterError,
    Stage,
    TaskRecord,
    WorkerHello,
)
from squire_kernel.errors import PayloadError
from squire_kernel.serde import Serializer, decode_params
from squire_kernel.wire import fill_execution_err

# Stream messages stay well below gRPC's 64 MiB limit: tasks and items go out
# in messages bounded in count and in payload bytes (one larger task or
# item goes alone).
MAX_TASKS_PER_MESSAGE = 512
MAX_ITEMS_PER_MESSAGE = 1024
MAX_BYTES_PER_MESSAGE = 4 * 1024 * 1024

JSON = int(Serializer.JSON)


def check_serializer(value: int, where: str) -> int:
    try:
        return int(Serializer.from_wire(value))
    except PayloadError as exc:
        raise RouterError(Code.INVALID_ARGUMENT, f"{where}: {exc}") from exc


def hello_from_pb(msg: pb.WorkerHello, peer: str) -> WorkerHello:
    return WorkerHello(
        worker_id=msg.worker_id,
        operations=frozenset(msg.operations),
        monoids=frozenset(msg.monoids),
        capacity=msg.capacity,
        prefetch=msg.prefetch,
        peer=peer,
        version=msg.version,
        held=tuple(
            HeldTask(h.routing_key, h.task_id, h.lease_id, h.digest) for h in msg.held
        ),
    )


def tasks_to_pb(tasks: list[TaskRecord]) -> list[pb.OrchestratorMessage]:
    """Task messages of at most ``MAX_TASKS_PER_MESSAGE`` tasks and about
    ``MAX_BYTES_PER_MESSAGE`` of payload each (one larger task goes alone)."""
    # The hot path. Tasks are built in place with add() and their fields set
    # one by one (faster than keyword arguments): a pb.Task built first and
    # then put in the batch is copied once per enclosing message (see
    # bench/README.md). Optional fields are set only when not the default,
    # the serializer too (0 is JSON on the wire).
    messages: list[pb.OrchestratorMessage] = []
    count = MAX_TASKS_PER_MESSAGE
    size = 0
    add = None
    for task in tasks:
        data = task.input
        kind = task.kind
        n = len(data)
        if kind:
            n += sum(map(len, task.operands))
        size += n
        if count == MAX_TASKS_PER_MESSAGE or (size > MAX_BYTES_PER_MESSAGE and count):
            message = pb.OrchestratorMessage()
            messages.append(message)
            add = message.tasks.tasks.add
            count = 0
            size = n
        assert add is not None
        count += 1
        msg = add()
        msg.routing_key = task.routing_key
        msg.task_id = task.task_id
        msg.operation = task.operation
        msg.input = data
        msg.lease_id = task.lease_id
        if task.serializer != JSON:
            msg.serializer = task.serializer  # type: ignore[assignment]  # an int, checked at publish
        if kind:
            msg.kind = pb.TaskKind.ValueType(kind)
            msg.operands.extend(task.operands)
        if task.params:
            msg.params = task.params
        if task.timeout_seconds:
            msg.timeout_seconds = task.timeout_seconds
    return messages


def ipc_to_pb(ipc: IpcMessage) -> pb.OrchestratorMessage:
    if ipc.kind == "execution_failed":
        msg = pb.WorkerIpc(
            execution_failed=pb.ExecutionFailed(routing_key=ipc.routing_key, message=ipc.message)
        )
    elif ipc.kind == "abort":
        msg = pb.WorkerIpc(abort=pb.Abort(routing_key=ipc.routing_key))
    elif ipc.kind == "abort_all":
        msg = pb.WorkerIpc(abort_all=pb.AbortAll())
    elif ipc.kind == "drain":
        msg = pb.WorkerIpc(drain=pb.Drain(grace_seconds=float(ipc.message or 0)))
    else:
        raise ValueError(f"unknown worker IPC {ipc.kind!r}")
    return pb.OrchestratorMessage(ipc=msg)


def results_from_pb(batch: pb.ResultBatch) -> list[WorkerResult]:
    """A worker's results as the core takes them (see ``WorkerResult``)."""
    # The hot path: each field is read once (not the routing key: the lease
    # id names the dispatch). An output is never empty (an encoded value is
    # at least one byte), so an empty one is the sign to look for an error.
    results: list[WorkerResult] = []
    append = results.append
    for r in batch.results:
        output = r.ok.output
        if output:
            append((r.lease_id, r.task_id, output, None, r.retries, r.execution_seconds))
        elif r.HasField("err"):
            e = r.err
            error = ErrorInfo(
                e.error_type, e.message, e.strategy, e.retries_exhausted, e.retries,
                _error_kind(e.kind),
            )
            retries = max(r.retries, e.retries)
            append((r.lease_id, r.task_id, b"", error, retries, r.execution_seconds))
        else:
            append((r.lease_id, r.task_id, output, None, r.retries, r.execution_seconds))
    return results


def _error_kind(value: int) -> ErrorKind:
    try:
        return ErrorKind(value)
    except ValueError:  # a newer worker's kind: treat as an operation failure
        return ErrorKind.OPERATION


def results_to_pb(results: list[ChannelResult]) -> pb.ResultBatch:
    batch = pb.ResultBatch()
    add = batch.results.add
    for r in results:
        task = r.task
        msg = add(
            routing_key=task.routing_key,
            task_id=task.task_id,
            metadata=task.metadata,
            attempt=task.attempt,
            lease_id=task.lease_id,
            execution_seconds=r.execution_seconds,
        )
        error = r.error
        if error is None:
            msg.ok.output = r.output
            continue
        fill_execution_err(msg.err, error)
    return batch


def spec_to_record(spec: pb.TaskSpec, position: int) -> TaskRecord:
    where = f"task {position} (task_id {spec.task_id})"
    serializer = check_serializer(spec.serializer, where)
    if spec.kind not in (APPLY, COMBINE):
        raise RouterError(Code.INVALID_ARGUMENT, f"{where}: unknown task kind {spec.kind}")
    if spec.params:
        _check_params(spec.params, serializer, f"{where} params")
    return TaskRecord(
        routing_key="",
        task_id=spec.task_id,
        operation=spec.operation,
        kind=spec.kind,
        params=spec.params,
        input=spec.input,
        operands=list(spec.operands),
        serializer=serializer,
        metadata=spec.metadata,
    )


MAX_PRIORITY = 1000


def plan_from_pb(plan: pb.Plan) -> PlanSpec:
    serializer = check_serializer(plan.serializer, "plan")
    stages: list[Stage] = []
    for position, stage in enumerate(plan.stages):
        kind = stage.WhichOneof("kind")
        spec: Stage
        if kind == "map":
            spec = MapStage(stage.map.operation, stage.map.params)
        elif kind == "fold":
            spec = FoldStage(stage.fold.monoid, stage.fold.params)
        else:
            raise RouterError(
                Code.INVALID_ARGUMENT, f"plan stage {position} is neither map nor fold"
            )
        if spec.params:
            where = f"plan stage {position} ({spec.describe()}) params"
            _check_params(spec.params, serializer, where)
        stages.append(spec)
    if plan.task_timeout_seconds < 0:
        raise RouterError(Code.INVALID_ARGUMENT, "plan task_timeout_seconds is negative")
    if not -MAX_PRIORITY <= plan.priority <= MAX_PRIORITY:
        raise RouterError(
            Code.INVALID_ARGUMENT,
            f"plan priority {plan.priority} is out of range (-{MAX_PRIORITY} to {MAX_PRIORITY})",
        )
    return PlanSpec(
        stages=tuple(stages),
        serializer=serializer,
        expected_items=plan.expected_items,
        task_timeout_seconds=plan.task_timeout_seconds,
        detached=plan.detached,
        priority=plan.priority,
    )


def _check_params(data: bytes, serializer: int, where: str) -> None:
    # Parameters are tiny and decoded once per stage, so the orchestrator
    # validates them up front instead of failing on every element later.
    try:
        decode_params(data, Serializer(serializer), what=where)
    except PayloadError as exc:
        raise RouterError(Code.INVALID_ARGUMENT, str(exc)) from exc


def add_items(new_event: Callable[[], pb.DirectiveEvent], items: Items) -> None:
    """Item events of at most ``MAX_ITEMS_PER_MESSAGE`` items each, built in
    place in the events ``new_event`` returns (``add`` of a repeated field,
    or a factory of messages to write)."""
    indexes, values = items.indexes, items.values
    for lo in range(0, len(indexes), MAX_ITEMS_PER_MESSAGE):
        add = new_event().items.items.add
        for index, value in zip(
            indexes[lo : lo + MAX_ITEMS_PER_MESSAGE], values[lo : lo + MAX_ITEMS_PER_MESSAGE],
            strict=True,
        ):
            msg = add()
            msg.index = index
            msg.value = value
    skipped = items.skipped
    for lo in range(0, len(skipped), MAX_ITEMS_PER_MESSAGE):
        add = new_event().items.items.add
        for index, error in skipped[lo : lo + MAX_ITEMS_PER_MESSAGE]:
            msg = add()
            msg.index = index
            msg.skipped = True
            msg.error = error


def add_final_events(new_event: Callable[[], pb.DirectiveEvent], end: EndCall) -> None:
    """The last events of a directive that is done: progress, then the fold value."""
    fill_progress(new_event().progress, end.progress)
    if end.fold_value is not None:
        new_event().fold.value = end.fold_value


class EventsToWrite(list[pb.DirectiveEvent]):
    """Events as separate messages, for RunDirective, which writes each:
    pass ``new`` where an ``add_*`` function takes ``new_event``."""

    def new(self) -> pb.DirectiveEvent:
        event = pb.DirectiveEvent()
        self.append(event)
        return event


def fill_progress(msg: pb.Progress, p: ProgressSnapshot) -> None:
    msg.received = p.received
    msg.completed = p.completed
    msg.skipped = p.skipped
    msg.total = p.total
    msg.queued = p.queued
    msg.leased = p.leased
    msg.retries = p.retries
    msg.tasks_done = p.tasks_done
    if p.waiting:
        msg.waiting = p.waiting


def progress_to_pb(p: ProgressSnapshot) -> pb.Progress:
    msg = pb.Progress()
    fill_progress(msg, p)
    return msg
