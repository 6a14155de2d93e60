"""Translation between wire messages and the core's plain values: the only
module of the orchestrator that knows both."""

from __future__ import annotations

from squire._errors import PayloadError
from squire._serde import Serializer, decode_params
from squire._wire import fill_execution_err
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service._core import IpcMessage
from orchestrator_service._directive import Directive, ItemOutcome, ProgressSnapshot
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    ChannelResult,
    Code,
    ErrorInfo,
    ErrorKind,
    PlanSpec,
    ResultEvent,
    RouterError,
    StageSpec,
    TaskRecord,
    WorkerHello,
)


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
    )


def tasks_to_pb(tasks: list[TaskRecord]) -> pb.OrchestratorMessage:
    # The hot path. Tasks are built in place with add() and their fields set
    # one by one (faster than keyword arguments): a pb.Task built first and
    # then put in the batch is copied once per enclosing message (see
    # bench/README.md). Optional fields are set only when not the default.
    message = pb.OrchestratorMessage()
    add = message.tasks.tasks.add
    for task in tasks:
        msg = add()
        msg.routing_key = task.routing_key
        msg.task_id = task.task_id
        msg.operation = task.operation
        msg.input = task.input
        msg.serializer = task.serializer  # type: ignore[assignment]  # an int, checked at publish
        msg.attempt = task.attempt
        msg.lease_id = task.lease_id
        if task.kind:
            msg.kind = pb.TaskKind.ValueType(task.kind)
            msg.operands.extend(task.operands)
        if task.params:
            msg.params = task.params
        if task.metadata:
            msg.metadata = task.metadata
        if task.timeout_seconds:
            msg.timeout_seconds = task.timeout_seconds
    return message


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


def results_from_pb(batch: pb.ResultBatch) -> list[ResultEvent]:
    # The hot path: fields are read once each and only where needed (the
    # routing key is not: the lease id names the dispatch).
    events: list[ResultEvent] = []
    append = events.append
    for r in batch.results:
        if r.HasField("err"):
            e = r.err
            error = ErrorInfo(
                e.error_type, e.message, e.strategy, e.retries_exhausted, e.retries,
                _error_kind(e.kind),
            )
            append(ResultEvent(r.task_id, r.lease_id, b"", error, max(r.retries, e.retries)))
        else:
            append(ResultEvent(r.task_id, r.lease_id, r.ok.output, None, r.retries))
    return events


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


def plan_from_pb(plan: pb.Plan) -> PlanSpec:
    serializer = check_serializer(plan.serializer, "plan")
    stages = []
    for position, stage in enumerate(plan.stages):
        kind = stage.WhichOneof("kind")
        if kind == "map":
            spec = StageSpec(stage.map.operation, stage.map.params)
        elif kind == "fold":
            spec = StageSpec(stage.fold.monoid, stage.fold.params, fold=True)
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
    return PlanSpec(
        stages=tuple(stages),
        serializer=serializer,
        expected_items=plan.expected_items,
        task_timeout_seconds=plan.task_timeout_seconds,
    )


def _check_params(data: bytes, serializer: int, where: str) -> None:
    # Parameters are tiny and decoded once per stage, so the orchestrator
    # validates them up front instead of failing on every element later.
    try:
        decode_params(data, Serializer(serializer), what=where)
    except PayloadError as exc:
        raise RouterError(Code.INVALID_ARGUMENT, str(exc)) from exc


def items_to_pb(items: list[ItemOutcome]) -> pb.DirectiveEvent:
    event = pb.DirectiveEvent()
    add = event.items.items.add
    for i in items:
        msg = add()
        msg.index = i.index
        if i.skipped:
            msg.skipped = True
            msg.error = i.error
        else:
            msg.value = i.value
    return event


def final_events(directive: Directive) -> list[pb.DirectiveEvent]:
    """The last events of a directive that is done: progress, then the fold value."""
    events = [pb.DirectiveEvent(progress=progress_to_pb(directive.progress()))]
    if directive.fold_value is not None:
        events.append(pb.DirectiveEvent(fold=pb.FoldValue(value=directive.fold_value)))
    return events


def progress_to_pb(p: ProgressSnapshot) -> pb.Progress:
    return pb.Progress(
        received=p.received,
        completed=p.completed,
        skipped=p.skipped,
        total=p.total,
        queued=p.queued,
        running=p.running,
        retries=p.retries,
        tasks_done=p.tasks_done,
    )
