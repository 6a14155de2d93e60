"""The edge: proto messages to plain values and back. Nothing else imports pb."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from squire.api.v1 import squire_pb2 as pb

from worker_service._model import TaskResult, TaskSpec

# Results go out in messages of at most this many payload bytes, well below
# the 64 MiB message limit, so one big output cannot make a batch unsendable.
MAX_BATCH_BYTES = 16 * 1024 * 1024


def tasks_from_wire(tasks: Iterable[pb.Task]) -> list[TaskSpec]:
    return [
        TaskSpec(
            t.routing_key, t.task_id, t.operation, t.kind, t.params, t.input,
            tuple(t.operands), t.serializer, t.metadata, t.attempt, t.lease_id, t.timeout_seconds,
        )
        for t in tasks
    ]


def hello(
    worker_id: str,
    operations: Iterable[str],
    monoids: Iterable[str],
    capacity: int,
    prefetch: int,
    version: str,
) -> pb.WorkerMessage:
    return pb.WorkerMessage(
        hello=pb.WorkerHello(
            worker_id=worker_id,
            operations=sorted(operations),
            monoids=sorted(monoids),
            capacity=capacity,
            prefetch=prefetch,
            version=version,
        )
    )


def credit(window: int) -> pb.WorkerMessage:
    return pb.WorkerMessage(credit=pb.Credit(window=window))


def heartbeat(running: int, buffered: int) -> pb.WorkerMessage:
    return pb.WorkerMessage(heartbeat=pb.Heartbeat(running=running, buffered=buffered))


def _result(r: TaskResult) -> pb.TaskResult:
    t = r.task
    outcome = r.outcome
    if isinstance(outcome, bytes):
        return pb.TaskResult(
            routing_key=t.routing_key, task_id=t.task_id, metadata=t.metadata,
            attempt=t.attempt, lease_id=t.lease_id, ok=pb.ExecutionOk(output=outcome),
            execution_seconds=r.execution_seconds, retries=r.retries,
        )
    return pb.TaskResult(
        routing_key=t.routing_key, task_id=t.task_id, metadata=t.metadata,
        attempt=t.attempt, lease_id=t.lease_id,
        err=pb.ExecutionErr(
            error_type=outcome.error_type,
            message=outcome.message,
            strategy=pb.FatalStrategy.ValueType(outcome.strategy),
            retries_exhausted=outcome.retries_exhausted,
            retries=outcome.retries,
            kind=pb.ErrorKind.ValueType(outcome.kind),
        ),
        execution_seconds=r.execution_seconds,
        retries=r.retries,
    )


def result_batches(results: Sequence[TaskResult]) -> Iterator[pb.WorkerMessage]:
    """One message for the usual case; several when outputs are large."""
    batch: list[pb.TaskResult] = []
    size = 0
    for r in results:
        n = len(r.outcome) if isinstance(r.outcome, bytes) else 0
        n += len(r.task.metadata)
        if batch and size + n > MAX_BATCH_BYTES:
            yield pb.WorkerMessage(results=pb.ResultBatch(results=batch))
            batch, size = [], 0
        batch.append(_result(r))
        size += n
    if batch:
        yield pb.WorkerMessage(results=pb.ResultBatch(results=batch))
