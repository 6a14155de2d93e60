"""Adoption: a reconnecting worker's tasks from an earlier stream, leased back.

A worker whose stream broke (the orchestrator restarted, or the network
failed) keeps running what it had and names those tasks in its next hello
(``WorkerHello.held``). Each one this orchestrator still has pending -- in
a queue, or already leased to another worker -- is leased to that worker
again under its old lease id, so the result it sends counts and the task
does not run again. Pure: the router calls it with its own state.

A held task is adopted only when its digest matches the pending task's: a
task id names a computation only within one run of the router, and after a
restart a fold may have grouped its operands differently under the same id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence

from orchestrator_service._channel import Channel, OpDepth
from orchestrator_service._dispatch import Worker
from orchestrator_service._model import HeldTask, QueueKey, TaskRecord
from squire_kernel.wire import task_digest


def digest(task: TaskRecord) -> int:
    return task_digest(task.kind, task.operation, task.params, task.input, task.operands)


def adopt(
    worker: Worker,
    held: Sequence[HeldTask],
    channels: Mapping[str, Channel],
    workers: Mapping[str, Worker],
    queues: dict[QueueKey, OpDepth],
    ready: dict[str, Channel],
) -> int:
    """Lease ``held`` tasks still pending back to ``worker``; returns how many.

    A queued one leaves its queue; one leased to another worker moves here
    (that worker's result for it will be a duplicate, and ignored)."""
    wanted: dict[tuple[str, int], HeldTask] = {}
    leases = {ref.lease_id for ref in held}
    if len(leases) < len(held) or 0 in leases:
        return 0  # not what a worker sends: adopt nothing
    for ref in held:
        if ref.routing_key in channels and ref.lease_id not in worker.leases:
            wanted[(ref.routing_key, ref.task_id)] = ref
    if not wanted:
        return 0
    adopted = 0
    keys = {key for key, _ in wanted}
    for key in keys:
        channel = channels[key]
        for queue_key, fifo in channel.fifos.items():
            found = [t for t in fifo if (key, t.task_id) in wanted]
            if not found:
                continue
            taken = {id(t) for t in found}
            kept = deque(t for t in fifo if id(t) not in taken)
            fifo.clear()
            fifo.extend(kept)
            channel.queued -= len(found)
            queues[queue_key].depth -= len(found)
            for task in found:
                if _lease(worker, wanted, task, channel):
                    adopted += 1
                else:  # the same id, another computation: it stays queued
                    channel.queued += 1
                    queues[queue_key].depth += 1
                    fifo.appendleft(task)
        if not channel.queued:
            ready.pop(key, None)
    if wanted:
        for other in workers.values():
            if other is worker:
                continue
            moved = [
                (lease_id, task) for lease_id, task in other.leases.items()
                if (task.routing_key, task.task_id) in wanted
            ]
            for lease_id, task in moved:
                channel = channels[task.routing_key]
                del other.leases[lease_id]
                channel.leased -= 1
                if _lease(worker, wanted, task, channel):
                    adopted += 1
                else:
                    other.leases[lease_id] = task
                    channel.leased += 1
    # Finished ones count too (their results are on the way): the window
    # may be over-full until they arrive, and nothing more is sent till then.
    worker.held_at_resize = max(worker.held_at_resize, len(worker.leases))
    return adopted


def _lease(
    worker: Worker, wanted: dict[tuple[str, int], HeldTask], task: TaskRecord, channel: Channel
) -> bool:
    ref = wanted.get((task.routing_key, task.task_id))
    if ref is None or digest(task) != ref.digest:
        return False
    del wanted[(task.routing_key, task.task_id)]
    task.lease_id = ref.lease_id
    task.attempt = max(task.attempt, 1)
    # The worker did not die with it: that disconnect was not its crash.
    task.crashes = max(task.crashes - 1, 0)
    worker.leases[ref.lease_id] = task
    channel.leased += 1
    return True
