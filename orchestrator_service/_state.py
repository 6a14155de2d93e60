"""The routing core's state and its primitive moves (see ``_core``).

``RouterState`` holds the workers, channels, directives and queue depths,
and the moves every handler is built from: queue tasks, re-queue a lease,
dispatch, deliver outcomes, release a channel. What it wants done goes to
the instruction list ``Router.handle`` returns. No I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from orchestrator_service._admission import unserved
from orchestrator_service._channel import Channel, OpDepth
from orchestrator_service._directive import Directive
from orchestrator_service._dispatch import TenantHold, Worker, dispatch
from orchestrator_service._events import (
    EmitResults,
    EndChannel,
    Instruction,
    IpcMessage,
    JournalChannel,
    SendIpc,
    SendTasks,
)
from orchestrator_service._journal_records import DELIVERED
from orchestrator_service._model import (
    IGNORE,
    ChannelResult,
    ErrorInfo,
    ErrorKind,
    ProgressSnapshot,
    QueueKey,
    RouterConfig,
    Stats,
    TaskRecord,
    TenantShare,
)
from orchestrator_service._outcomes import Outcomes
from orchestrator_service._validate import validate_router


class RouterState:
    def __init__(self, config: RouterConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self.channels: dict[str, Channel] = {}
        self.directives: dict[str, Directive] = {}
        self.queues: dict[QueueKey, OpDepth] = {}
        self.stats = Stats()
        self.accepting = True
        self.offered: set[QueueKey] = set()  # what any worker ever offered (for hints)
        self._ready: dict[str, Channel] = {}  # channels with queued tasks, round-robin order
        self._lease_ids = itertools.count(1)
        self.epoch = 0
        self._worker_rotation = 0
        self._dispatch_needed = False
        # Dispatch waits until then for the workers of restored directives.
        self.adoption_until: float | None = None
        self._out: list[Instruction] = []
        self._touched: dict[str, Directive] = {}
        self._done: list[TaskRecord] = []
        self.tenants: dict[str, TenantShare] = {}  # weights and quotas (TenantsChanged)
        # Directives whose input credit waits for their tenant's queue to fall
        # under max_queued_tasks.
        self._withheld: dict[str, Directive] = {}
        # Per tenant of the file (metrics): tasks completed, and times a
        # directive's input credit was held back by max_queued_tasks.
        self.tenant_completed: dict[str, int] = {}
        self.tenant_throttled: dict[str, int] = {}

    def begin_epoch(self, epoch: int) -> None:
        """Lease ids from now on carry ``epoch``: unique across orchestrator
        runs, so a result for a lease of an earlier run never matches a lease
        of this one unless this one adopted it (see ``_adopt``)."""
        self.epoch = epoch
        self._lease_ids = itertools.count((epoch << 40) + 1)

    # ============================================================ queries

    def progress(self, directive_id: str) -> ProgressSnapshot | None:
        directive = self.directives.get(directive_id)
        channel = self.channels.get(directive_id)
        if directive is None or channel is None:
            return None
        waiting = ""
        for key, fifo in channel.fifos.items():
            if fifo and self.queues[key].unserved_since is not None:
                waiting = unserved(key, self.offered, self.config.no_worker_timeout, failed=False)
                break
        return directive.progress(channel.queued, channel.leased, waiting)

    def can_publish(self, channel_id: str) -> bool:
        channel = self.channels.get(channel_id)
        if channel is None:
            return True
        return channel.queued < self.config.max_queued_per_channel and self.tenant_has_room(
            channel.tenant
        )

    def tenant_has_room(self, tenant: str) -> bool:
        """Its queued tasks are under its max_queued_tasks (if it has one)."""
        share = self.tenants.get(tenant)
        if share is None or share.max_queued_tasks is None:
            return True
        queued = sum(c.queued for c in self.channels.values() if c.tenant == tenant)
        return queued < share.max_queued_tasks

    # =========================================================== internal

    def _enqueue(self, channel: Channel, tasks: list[TaskRecord]) -> None:
        channel.push(tasks, self.queues)
        if channel.id not in self._ready:
            self._ready[channel.id] = channel
        channel.published += len(tasks)
        self.stats.published += len(tasks)
        self._dispatch_needed = True

    def _requeue(self, channel: Channel, task: TaskRecord, *, count: bool = True) -> None:
        """A leased task goes back to the front of its queue: it has waited longest."""
        task.lease_id = 0
        channel.leased -= 1
        channel.push([task], self.queues, front=True)
        if channel.id not in self._ready:
            self._ready[channel.id] = channel
        if count:
            self.stats.requeued += 1
        self._dispatch_needed = True

    def _pump(self) -> None:
        """Fill every worker's free credit (see ``_dispatch``)."""
        self._dispatch_needed = False
        if self.adoption_until is not None:
            if self.clock() < self.adoption_until:
                return  # a Tick after it dispatches
            self.adoption_until = None
        if self.workers and self._ready:
            self._worker_rotation = (self._worker_rotation + 1) % len(self.workers)
            shares = None
            if self.tenants or len(self._ready) > 1:
                shares = self._tenant_shares()
            sent = dispatch(
                self.workers, self._worker_rotation, self._ready, self.queues,
                self.config.fairness_quantum, self._lease_ids, shares,
            )
            for worker_id, tasks in sent:
                self.stats.dispatched += len(tasks)
                self._out.append(SendTasks(worker_id, tasks))

    def _tenant_shares(self) -> TenantHold | None:
        """Each tenant's weight and the slots its tasks hold now, when more
        than one tenant has tasks queued or priorities differ (else the plain
        round-robin of dispatch is the same)."""
        ready = {c.tenant for c in self._ready.values()}
        if len(ready) < 2 and len({c.priority for c in self._ready.values()}) < 2:
            return None
        held: dict[str, int] = dict.fromkeys(ready, 0)
        for channel in self.channels.values():
            if channel.tenant in held:
                held[channel.tenant] += channel.leased
        weights = {t: (self.tenants[t].weight if t in self.tenants else 1) for t in ready}
        return TenantHold(weights, held)

    def _deliver(self, channel: Channel, group: Outcomes.Group, now: float) -> None:
        """Outcomes of one channel's tasks (none of them leased any more)."""
        tasks = group.tasks
        errors = group.errors
        failed = sum(1 for e in errors if e is not None) if errors is not None else 0
        self.stats.ok += len(tasks) - failed
        if failed:
            assert errors is not None
            self.stats.ignored += sum(1 for e in errors if e is not None and e.strategy == IGNORE)
        channel.completed += len(tasks)
        self._done.extend(tasks)
        if self.tenants:
            tenant = channel.tenant
            self.tenant_completed[tenant] = self.tenant_completed.get(tenant, 0) + len(tasks)
        if channel.directive:
            directive = self.directives[channel.id]
            directive.retries += group.retries
            follow = directive.on_results(tasks, group.outputs, errors, now)
            if follow:
                self._enqueue(channel, follow)
            self._touched[directive.id] = directive
            return
        pending = channel.pending_ids
        results = []
        for position, task in enumerate(tasks):
            pending.discard(task.task_id)
            error = errors[position] if errors is not None else None
            results.append(
                ChannelResult(task, group.outputs[position], error, group.seconds[position])
            )
        channel.unread += len(results)
        if self.config.journal:
            self._out.append(JournalChannel(channel.id, [(
                DELIVERED, [t.task_id for t in tasks], group.outputs, errors, group.seconds,
            )]))
        self._out.append(EmitResults(channel.id, results))
        if channel.drained:
            self._out.append(EndChannel(channel.id, released=False))

    def _poison(self, channel: Channel, task: TaskRecord) -> None:
        self.stats.poison += 1
        message = (
            f"poison task: task {task.task_id} ({task.operation!r}) killed its worker "
            f"{task.crashes} times"
        )
        group = Outcomes.Group()
        group.add(task, b"", ErrorInfo("PoisonTask", message, kind=ErrorKind.CRASHED), 0.0)
        self._deliver(channel, group, self.clock())

    def _terminate(self, channel: Channel, ipc: IpcMessage) -> None:
        """Drop the channel's queued tasks and tell every worker to abort its key."""
        self._drop_queued(channel)
        for worker in self.workers.values():
            self._send_ipc(worker.id, ipc)

    def _release(self, channel: Channel) -> None:
        self._drop_queued(channel)
        del self.channels[channel.id]

    def _drop_queued(self, channel: Channel) -> None:
        self.stats.cancelled += channel.drop_queued(self.queues)
        self._ready.pop(channel.id, None)

    def _send_ipc(self, worker_id: str, ipc: IpcMessage) -> None:
        self._out.append(SendIpc(worker_id, ipc))
        self.stats.ipc_sent += 1

    # ========================================================= validation

    def validate(self) -> None:
        """Assert every invariant of the module docstring (tests, simulator)."""
        validate_router(self)
