"""Dispatch: connected workers, their leases, and filling their credit.

``dispatch`` is the one place tasks leave their queues for a worker: it
serves ready channels round-robin, ``quantum`` tasks per turn, so concurrent
directives share the workers fairly, and never sends a worker more than its
free credit (window minus unreported leases). Pure: the router turns what
it returns into ``SendTasks`` instructions.

With tasks of several tenants queued, the workers' slots are shared between
tenants by weight first: each turn goes to the tenant whose tasks hold the
fewest slots per unit of weight (weighted max-min fairness on held slots,
so with tasks of similar length each tenant's share of worker time follows
its weight), and within a tenant to its highest-priority channel with
tasks the worker can run, equal priorities round-robin as above.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(slots=True)
class TenantHold:
    """Per tenant with tasks queued: its weight and the slots its tasks hold."""

    weights: dict[str, int]
    held: dict[str, int]


def dispatch(
    workers: dict[str, Worker],
    rotation: int,
    ready: dict[str, Channel],
    queues: dict[QueueKey, OpDepth],
    quantum: int,
    lease_ids: Iterator[int],
    tenants: TenantHold | None = None,
) -> list[tuple[str, list[TaskRecord]]]:
    """Lease queued tasks to every worker with free credit, starting at the
    worker ``rotation`` (so equal workers share a small backlog); returns
    (worker id, tasks) per worker that got any. ``ready`` keeps its
    round-robin order: a channel served goes to the back. ``tenants``
    (several tenants have tasks queued): weighted fair share first."""
    order = list(workers.values())
    order = order[rotation:] + order[:rotation]
    if tenants is not None:
        return _dispatch_shared(order, ready, queues, quantum, lease_ids, tenants)
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
                _lease(worker, channel, tasks, lease_ids)
                sent.extend(tasks)
                free -= len(tasks)
                if free <= 0:
                    break
        if sent:
            out.append((worker.id, sent))
    return out


def _lease(worker: Worker, channel: Channel, tasks: list[TaskRecord],
           lease_ids: Iterator[int]) -> None:
    leases = worker.leases
    for task in tasks:
        task.attempt += 1
        lease_id = task.lease_id = next(lease_ids)
        leases[lease_id] = task
    channel.leased += len(tasks)


def _dispatch_shared(
    order: list[Worker],
    ready: dict[str, Channel],
    queues: dict[QueueKey, OpDepth],
    quantum: int,
    lease_ids: Iterator[int],
    tenants: TenantHold,
) -> list[tuple[str, list[TaskRecord]]]:
    """``dispatch`` across tenants: each turn (at most ``quantum`` tasks) to
    the tenant holding the fewest slots per weight, among those with a
    channel the worker can serve; its channels take turns in ``ready`` order."""
    weights, held = tenants.weights, tenants.held
    out = []
    for worker in order:
        free = worker.free
        if free <= 0:
            continue
        sent: list[TaskRecord] = []
        stuck: set[str] = set()  # tenants with nothing this worker offers
        while free > 0 and ready:
            candidates = {c.tenant for c in ready.values()} - stuck
            if not candidates:
                break
            tenant = min(candidates, key=lambda t: (held[t] / weights[t], -weights[t]))
            tasks: list[TaskRecord] = []
            # Its channels by priority, highest first; equal ones in round-robin
            # order (sorted() is stable).
            mine = sorted((c for c in ready.values() if c.tenant == tenant),
                          key=lambda c: -c.priority)
            for channel in mine:
                tasks = channel.take(worker.supports, min(free, quantum), queues)
                if not tasks:
                    continue
                del ready[channel.id]
                if channel.queued:
                    ready[channel.id] = channel  # to the back of the round
                _lease(worker, channel, tasks, lease_ids)
                break
            if not tasks:
                stuck.add(tenant)
                continue
            held[tenant] += len(tasks)
            sent.extend(tasks)
            free -= len(tasks)
        if sent:
            out.append((worker.id, sent))
    return out
