"""Dispatch: connected workers, their leases, and filling their credit.

``dispatch`` is the one place tasks leave their queues for a worker: it
serves ready channels round-robin, ``quantum`` tasks per turn, so concurrent
directives share the workers fairly, and never sends a worker more than its
free credit (window minus unreported leases). Pure: the router turns what
it returns into ``SendTasks`` instructions.
"""

from __future__ import annotations

from collections.abc import Iterator

from orchestrator_service._channel import Channel, OpDepth
from orchestrator_service._model import APPLY, COMBINE, QueueKey, TaskRecord, WorkerHello


class Worker:
    """One connected worker stream (a reconnect is a new Worker)."""

    def __init__(self, hello: WorkerHello, now: float) -> None:
        self.hello = hello
        self.id = hello.worker_id
        self.window = hello.capacity + hello.prefetch
        self.supports: frozenset[QueueKey] = frozenset(
            [(APPLY, op) for op in hello.operations] + [(COMBINE, m) for m in hello.monoids]
        )
        # lease id -> task, in dispatch order: the worker runs FIFO, so the
        # first `capacity` entries are the ones executing. Lease ids are
        # unique per orchestrator, so one names one dispatch of one task.
        self.leases: dict[int, TaskRecord] = {}
        self.connected_at = now
        self.last_seen = now
        self.completed = 0
        self.executing = self.buffered = 0  # as of the worker's last heartbeat
        # Leases held when the window last changed (or adopted at hello, see
        # _adopt): over the window they may finish, but nothing more is sent
        # until below it.
        self.held_at_resize = 0

    @property
    def free(self) -> int:
        return self.window - len(self.leases)


def dispatch(
    workers: dict[str, Worker],
    rotation: int,
    ready: dict[str, Channel],
    queues: dict[QueueKey, OpDepth],
    quantum: int,
    lease_ids: Iterator[int],
) -> list[tuple[str, list[TaskRecord]]]:
    """Lease queued tasks to every worker with free credit, starting at the
    worker ``rotation`` (so equal workers share a small backlog); returns
    (worker id, tasks) per worker that got any. ``ready`` keeps its
    round-robin order: a channel served goes to the back."""
    order = list(workers.values())
    order = order[rotation:] + order[:rotation]
    out = []
    for worker in order:
        free = worker.free
        if free <= 0:
            continue
        sent: list[TaskRecord] = []
        progressed = True
        while free > 0 and progressed and ready:
            progressed = False
            # With one channel ready there is nobody to be fair to.
            turn = quantum if len(ready) > 1 else free
            for channel in list(ready.values()):
                tasks = channel.take(worker.supports, min(free, turn), queues)
                if not tasks:
                    continue
                progressed = True
                del ready[channel.id]
                if channel.queued:
                    ready[channel.id] = channel  # to the back of the round
                leases = worker.leases
                for task in tasks:
                    task.attempt += 1
                    lease_id = task.lease_id = next(lease_ids)
                    leases[lease_id] = task
                channel.leased += len(tasks)
                sent.extend(tasks)
                free -= len(tasks)
                if free <= 0:
                    break
        if sent:
            out.append((worker.id, sent))
    return out
