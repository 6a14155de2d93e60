"""The edge: proto messages to plain values and back. Nothing else imports pb."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from squire.api.v1 import squire_pb2 as pb

from squire_kernel.wire import fill_execution_err, task_digest
from worker_service._model import TaskSpec
from worker_service._scheduler_events import Report

# Results go out in messages of at most this many payload bytes, well below
# the 64 MiB message limit, so one big output cannot make a batch unsendable.
MAX_BATCH_BYTES = 16 * 1024 * 1024


def tasks_from_wire(tasks: Iterable[pb.Task]) -> list[TaskSpec]:
    # One comprehension, no call per task: a batch holds thousands. Only a
    # fold combine (a non-zero kind) carries operands; reading an empty
    # repeated field still costs a Python object per task.
    return [
        TaskSpec(
            t.routing_key, t.task_id, t.operation, kind, t.params, t.input,
            tuple(t.operands) if kind else (), t.serializer, t.lease_id, t.timeout_seconds,
        )
        for t in tasks
        for kind in (t.kind,)  # read once (a one-item loop compiles to an assignment)
    ]


def held(tasks: Iterable[TaskSpec]) -> list[pb.HeldTask]:
    """``tasks`` as a hello names them: held from an earlier stream."""
    return [
        pb.HeldTask(
            routing_key=t.routing_key, task_id=t.task_id, lease_id=t.lease_id,
            digest=task_digest(t.kind, t.operation, t.params, t.input, t.operands),
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
    held: Iterable[pb.HeldTask] = (),
) -> pb.WorkerMessage:
    return pb.WorkerMessage(
        hello=pb.WorkerHello(
            worker_id=worker_id,
            operations=sorted(operations),
            monoids=sorted(monoids),
            capacity=capacity,
            prefetch=prefetch,
            version=version,
            held=held,
        )
    )


def credit(window: int) -> pb.WorkerMessage:
    return pb.WorkerMessage(credit=pb.Credit(window=window))


def heartbeat(running: int, buffered: int) -> pb.WorkerMessage:
    return pb.WorkerMessage(heartbeat=pb.Heartbeat(executing=running, buffered=buffered))


class ResultBuffer:
    """Results waiting for the writer, already in their wire messages.

    Each result is added in place (``add()``, then its fields one by one):
    building a pb.TaskResult first and putting it in a batch would copy it
    once per enclosing message (see bench/README.md). A message is closed at ``MAX_BATCH_BYTES`` of
    payload, so one big output cannot make a batch unsendable.
    """

    __slots__ = ("_add", "_messages", "_size")

    def __init__(self) -> None:
        self._messages: list[pb.WorkerMessage] = []
        self._size = 0
        self._add: Callable[[], pb.TaskResult] | None = None

    def __bool__(self) -> bool:
        return bool(self._messages)

    def _results(self, n: int) -> Callable[[], pb.TaskResult]:
        """The adder of the message ``n`` more payload bytes go into."""
        add = self._add
        if add is None or self._size + n > MAX_BATCH_BYTES:
            message = pb.WorkerMessage()
            self._messages.append(message)
            add = self._add = message.results.results.add
            self._size = 0
        self._size += n
        return add

    def add(self, results: Iterable[Report]) -> None:
        """Add reported results, each in place."""
        # The hot path is an ok result: _results() inlined, and fields set
        # one by one after add() (faster than keyword arguments). Metadata
        # and attempt are not echoed: the orchestrator keeps both.
        add = self._add
        for task, outcome in results:
            n = len(outcome) if isinstance(outcome, bytes) else len(outcome.message)
            if add is None or self._size + n > MAX_BATCH_BYTES:
                add = self._results(n)
            else:
                self._size += n
            msg = add()
            msg.routing_key = task.routing_key
            msg.task_id = task.task_id
            msg.lease_id = task.lease_id
            msg.execution_seconds = task.elapsed
            if isinstance(outcome, bytes):
                msg.ok.output = outcome
            else:
                fill_execution_err(msg.err, outcome)
            if task.retries:
                msg.retries = task.retries

    def take(self) -> list[pb.WorkerMessage]:
        messages, self._messages = self._messages, []
        self._add = None
        self._size = 0
        return messages
