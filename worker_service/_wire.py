"""The edge: proto messages to plain values and back. Nothing else imports pb."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from squire.api.v1 import squire_pb2 as pb

from worker_service._model import TaskResult, TaskSpec

# Results go out in messages of at most this many payload bytes, well below
# the 64 MiB message limit, so one big output cannot make a batch unsendable.
MAX_BATCH_BYTES = 16 * 1024 * 1024


def tasks_from_wire(tasks: Iterable[pb.Task]) -> list[TaskSpec]:
    out = []
    for t in tasks:
        kind = t.kind
        # Only a fold combine carries operands; reading an empty repeated
        # field still costs a Python object per task.
        operands = tuple(t.operands) if kind else ()
        out.append(TaskSpec(
            t.routing_key, t.task_id, t.operation, kind, t.params, t.input, operands,
            t.serializer, t.metadata, t.attempt, t.lease_id, t.timeout_seconds,
        ))
    return out


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


def _add_result(batch: pb.ResultBatch, r: TaskResult) -> None:
    # Built in place with add(): constructing a TaskResult and putting it in
    # a list costs two more copies of it (see bench/README.md). Only fields
    # that differ from the proto defaults are set.
    t = r.task
    msg = batch.results.add(
        routing_key=t.routing_key, task_id=t.task_id, attempt=t.attempt, lease_id=t.lease_id,
        execution_seconds=r.execution_seconds,
    )
    if t.metadata:
        msg.metadata = t.metadata
    if r.retries:
        msg.retries = r.retries
    outcome = r.outcome
    if isinstance(outcome, bytes):
        msg.ok.output = outcome
        return
    err = msg.err
    err.error_type = outcome.error_type
    err.message = outcome.message
    err.strategy = pb.FatalStrategy.ValueType(outcome.strategy)
    err.retries_exhausted = outcome.retries_exhausted
    err.retries = outcome.retries
    err.kind = pb.ErrorKind.ValueType(outcome.kind)


def result_batches(results: Sequence[TaskResult]) -> Iterator[pb.WorkerMessage]:
    """One message for the usual case; several when outputs are large."""
    message = pb.WorkerMessage()
    batch = message.results
    size = count = 0
    for r in results:
        n = len(r.outcome) if isinstance(r.outcome, bytes) else 0
        n += len(r.task.metadata)
        if count and size + n > MAX_BATCH_BYTES:
            yield message
            message = pb.WorkerMessage()
            batch = message.results
            size = count = 0
        _add_result(batch, r)
        size += n
        count += 1
    if count:
        yield message
