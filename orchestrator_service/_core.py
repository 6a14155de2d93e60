"""The routing core: workers, leases, channels, directives, dispatch. No I/O.

``Router.handle(*events) -> list[Instruction]`` is the whole interface (see
``_events``): the servicers feed it what happened and execute what it
returns. Time comes from the injected ``clock``; ids come in the events.
This module holds the event handlers (those of leased channels are in
``_core_channels``); the state they change and the moves they are built
from are ``_state.RouterState``; dispatch is ``_dispatch``,
matching results to leases ``_outcomes``, evaluating a directive
``_directive``. Everything else on the Router is state the servicers and
metrics may read.

Invariants (``validate()`` asserts them; the simulator calls it after every
step):
- a task is in exactly one place: one channel FIFO, one worker's lease
  table, or done; queue depths, channel counters and the ready set agree;
- a worker is sent tasks only while it holds fewer than ``window``
  unreported ones (credit flow control);
- a task goes only to a worker that offers its operation (or monoid);
- a result is accepted once, from the worker holding the task's lease;
  anything else is dropped and counted as a duplicate;
- a finished directive leaves nothing behind: no channel, no queued task.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator_service import _admission as admission
from orchestrator_service._adopt import adopt
from orchestrator_service._channel import Channel
from orchestrator_service._core_channels import ChannelRouting
from orchestrator_service._directive import Directive
from orchestrator_service._dispatch import Worker
from orchestrator_service._events import (
    AcceptingStopped,
    ChannelClosed,
    ChannelLeased,
    ChannelReleased,
    ChannelRestored,
    CloseWorker,
    CreditChanged,
    DirectiveCancelled,
    DirectiveRestored,
    DirectiveSubmitted,
    DrainRequested,
    EmitItems,
    EndCall,
    Event,
    GrantCredit,
    HeartbeatReceived,
    InputEnded,
    InputsAccepted,
    Instruction,
    IpcMessage,
    Journal,
    QueueUnserved,
    Refused,
    ResultsArrived,
    ResultsTaken,
    TasksCompleted,
    TasksPublished,
    TenantsChanged,
    Tick,
    WorkerConnected,
    WorkerDisconnected,
)
from orchestrator_service._items import Items
from orchestrator_service._model import (
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    QueueKey,
    RouterConfig,
    TaskRecord,
    queue_label,
)
from orchestrator_service._outcomes import Outcomes, sort_results
from orchestrator_service._restore import replay


class Router(ChannelRouting):
    """The orchestrator's Runtime core: ``handle(events) -> instructions``."""

    def __init__(self, config: RouterConfig, clock: Callable[[], float]) -> None:
        super().__init__(config, clock)
        self._handlers: dict[type, Callable[[Event], None]] = {
            WorkerConnected: self._worker_connected,  # type: ignore[dict-item]
            WorkerDisconnected: self._worker_disconnected,  # type: ignore[dict-item]
            HeartbeatReceived: self._heartbeat,  # type: ignore[dict-item]
            CreditChanged: self._credit_changed,  # type: ignore[dict-item]
            ResultsArrived: self._results_arrived,  # type: ignore[dict-item]
            ChannelLeased: self._channel_leased,  # type: ignore[dict-item]
            TasksPublished: self._tasks_published,  # type: ignore[dict-item]
            ChannelClosed: self._channel_closed,  # type: ignore[dict-item]
            ChannelReleased: self._channel_released,  # type: ignore[dict-item]
            ChannelRestored: self._channel_restored,  # type: ignore[dict-item]
            ResultsTaken: self._results_taken,  # type: ignore[dict-item]
            DirectiveSubmitted: self._directive_submitted,  # type: ignore[dict-item]
            InputsAccepted: self._inputs_accepted,  # type: ignore[dict-item]
            InputEnded: self._input_ended,  # type: ignore[dict-item]
            DirectiveCancelled: self._directive_cancelled,  # type: ignore[dict-item]
            DirectiveRestored: self._directive_restored,  # type: ignore[dict-item]
            TenantsChanged: self._tenants_changed,  # type: ignore[dict-item]
            Tick: self._tick,  # type: ignore[dict-item]
            DrainRequested: self._drain_requested,  # type: ignore[dict-item]
            AcceptingStopped: self._accepting_stopped,  # type: ignore[dict-item]
        }

    def handle(self, *events: Event) -> list[Instruction]:
        handlers = self._handlers
        for event in events:
            handlers[type(event)](event)
        if self._touched:
            self._flush_directives()
        if self._withheld:
            self._release_credit()
        if self._dispatch_needed:
            self._pump()
        if self._done:
            self._out.append(TasksCompleted(self._done, self.clock()))
            self._done = []
        out, self._out = self._out, []
        return out

    # ============================================================ workers

    def _worker_connected(self, event: WorkerConnected) -> None:
        refused = admission.check_hello(event.hello, self.workers, self.config)
        if refused is not None:
            self._out.append(refused)
            return
        worker = Worker(event.hello, self.clock())
        self.workers[worker.id] = worker
        self.offered |= worker.supports
        if event.hello.held:
            self.stats.adopted += adopt(
                worker, event.hello.held, self.channels, self.workers, self.queues, self._ready
            )
        self._dispatch_needed = True

    def _worker_disconnected(self, event: WorkerDisconnected) -> None:
        worker = self.workers.pop(event.worker_id, None)
        if worker is None:
            return
        running = worker.hello.capacity
        for position, task in enumerate(worker.leases.values()):
            channel = self.channels.get(task.routing_key)
            if channel is None:
                continue
            # Only the first `capacity` tasks were executing; count the loss
            # against them, so a task that keeps killing workers becomes poison.
            if position < running:
                task.crashes += 1
                if task.crashes >= self.config.poison_threshold:
                    channel.leased -= 1
                    self._poison(channel, task)
                    continue
            self._requeue(channel, task)
        worker.leases.clear()
        self._dispatch_needed = True

    def _heartbeat(self, event: HeartbeatReceived) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is not None:
            worker.last_seen = self.clock()
            worker.executing = event.executing
            worker.buffered = event.buffered

    def _credit_changed(self, event: CreditChanged) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is not None:
            worker.last_seen = self.clock()
            worker.window = event.window
            worker.held_at_resize = len(worker.leases)
            self._dispatch_needed = True

    def _drain_requested(self, event: DrainRequested) -> None:
        ipc = IpcMessage("drain", message=f"{event.grace_seconds:g}")
        for worker in self.workers.values():
            self._send_ipc(worker.id, ipc)

    def _results_arrived(self, event: ResultsArrived) -> None:
        worker = self.workers.get(event.worker_id)
        if worker is None:  # its leases went back to the queues already
            self.stats.duplicates += len(event.results)
            return
        now = worker.last_seen = self.clock()
        outcomes = sort_results(worker, event.results, self.stats)
        if outcomes.reports:
            self._reports(outcomes)
        done = outcomes.done
        for key, group in outcomes.groups.items():
            channel = self.channels.get(key)
            if channel is None:
                self.stats.late += len(group.tasks)
                continue
            channel.leased -= len(group.tasks)
            self._deliver(channel, group, now)
        if done:
            worker.completed += done
            self._dispatch_needed = True

    def _reports(self, outcomes: Outcomes) -> None:
        """Reports that are not a task's outcome: re-queue, or turn to poison."""
        for task, error in outcomes.reports:
            channel = self.channels.get(task.routing_key)
            if channel is None:
                self.stats.late += 1
                continue
            if not self._redeliver(channel, task, error):
                # It is the task's outcome after all: delivered with its group
                # (which takes it off the channel's leased count).
                outcomes.add(task, b"", error, 0.0)

    # ========================================================= directives

    def _directive_submitted(self, event: DirectiveSubmitted) -> None:
        refused = admission.check_accepting(self.accepting) or admission.check_plan(
            event.plan, self.workers
        )
        if refused is None and event.directive_id in self.channels:
            refused = Refused(Code.ALREADY_EXISTS, "directive id already in use")
        if refused is None:
            refused = admission.check_tenant_directives(
                event.plan.tenant, self.tenants, self.directives.values()
            )
        if refused is not None:
            self._out.append(refused)
            return
        now = self.clock()
        key = event.directive_id
        self.channels[key] = Channel(
            key, now, directive=True, tenant=event.plan.tenant, priority=event.plan.priority
        )
        directive = Directive(
            key, event.plan, max_fold_operands=self.config.max_fold_operands, now=now,
            journal=self.config.journal,
        )
        self.directives[key] = directive
        if self.config.journal:
            self._out.append(Journal(key, [], 0, False, event.plan, now))
        self._out.append(GrantCredit(key, self.config.directive_window))

    def _directive_restored(self, event: DirectiveRestored) -> None:
        key = event.directive_id
        if key in self.channels:
            self._out.append(Refused(Code.ALREADY_EXISTS, "directive id already in use"))
            return
        now = self.clock()
        directive, outstanding, _ = replay(
            key, event.plan, event.records,
            max_fold_operands=self.config.max_fold_operands, now=now,
        )
        directive.started_at = event.created_at
        directive.log = [] if self.config.journal else None
        channel = self.channels[key] = Channel(
            key, now, directive=True, tenant=event.plan.tenant, priority=event.plan.priority
        )
        self.directives[key] = directive
        if outstanding:
            self._enqueue(channel, sorted(outstanding.values(), key=lambda t: t.task_id))
            if self.config.adoption_grace > 0 and self.adoption_until is None:
                self.adoption_until = now + self.config.adoption_grace
        # What finished before the restart counts as published and completed.
        channel.published += directive.tasks_done
        channel.completed += directive.tasks_done
        self._touched[key] = directive

    def _inputs_accepted(self, event: InputsAccepted) -> None:
        directive = self.directives.get(event.directive_id)
        if directive is None:  # it ended already: late inputs change nothing
            return
        if directive.input_closed:
            self._out.append(Refused(Code.INVALID_ARGUMENT, "inputs after end_input"))
            return
        tasks = directive.add_inputs(event.items, self.clock())
        if tasks:
            self._enqueue(self.channels[directive.id], tasks)
        self._touched[directive.id] = directive

    def _input_ended(self, event: InputEnded) -> None:
        directive = self.directives.get(event.directive_id)
        if directive is not None:
            directive.end_input()
            self._touched[directive.id] = directive

    def _directive_cancelled(self, event: DirectiveCancelled) -> None:
        directive = self.directives.get(event.directive_id)
        if directive is not None and not directive.finished:
            directive.cancel()
            self._touched[directive.id] = directive

    def _flush_directives(self) -> None:
        """After the events: what each touched directive wants done next."""
        now = self.clock()
        touched, self._touched = self._touched, {}
        for directive in touched.values():
            tasks = directive.advance(now)
            if tasks:
                self._enqueue(self.channels[directive.id], tasks)
            if directive.log:
                self._out.append(
                    Journal(directive.id, directive.log, directive.received, directive.input_closed)
                )
                directive.log = []
            if directive.items:
                directive.emitted += len(directive.items)
                self._out.append(EmitItems(directive.id, directive.items))
                directive.items = Items()
            if directive.finished:
                self._end_directive(directive, now)
                continue
            if not self.tenant_has_room(directive.plan.tenant):
                if directive.id not in self._withheld:
                    tenant = directive.plan.tenant
                    self.tenant_throttled[tenant] = self.tenant_throttled.get(tenant, 0) + 1
                self._withheld[directive.id] = directive  # its credit waits
                continue
            credit = directive.take_credit()
            if credit:
                self._out.append(GrantCredit(directive.id, credit))

    def _release_credit(self) -> None:
        """Input credit that waited for a tenant's queue to fall under its
        max_queued_tasks goes out once it has."""
        for key, directive in list(self._withheld.items()):
            if directive.finished or key not in self.directives:
                del self._withheld[key]
            elif self.tenant_has_room(directive.plan.tenant):
                del self._withheld[key]
                credit = directive.take_credit()
                if credit:
                    self._out.append(GrantCredit(key, credit))

    def _tenants_changed(self, event: TenantsChanged) -> None:
        self.tenants = dict(event.shares)
        self._dispatch_needed = True

    def _end_directive(self, directive: Directive, now: float) -> None:
        channel = self.channels[directive.id]
        if directive.state is DirectiveState.FAILED:
            self.stats.fatal += 1
            assert directive.failure is not None
            self._terminate(
                channel, IpcMessage("execution_failed", directive.id, directive.failure[1])
            )
        elif directive.state is DirectiveState.CANCELLED:
            self.stats.directives_cancelled += 1
            self._terminate(channel, IpcMessage("abort", directive.id))
        progress = directive.progress(channel.queued, channel.leased)
        self._release(channel)
        del self.directives[directive.id]
        end = directive.end_status()
        self._out.append(
            EndCall(
                directive.id, directive.state, end[0] if end else None, end[1] if end else "",
                directive.fold_value, progress, now - directive.started_at,
                directive.emitted,
            )
        )

    # =============================================================== time

    def _tick(self, event: Tick) -> None:
        now = self.clock()
        if self.adoption_until is not None and now >= self.adoption_until:
            self._dispatch_needed = True
        timeout = self.config.lease_timeout
        for worker in [w for w in self.workers.values() if now - w.last_seen > timeout]:
            self._out.append(
                CloseWorker(
                    worker.id,
                    f"no heartbeat within {timeout:g} s; this worker's tasks were re-queued",
                )
            )
            self._worker_disconnected(WorkerDisconnected(worker.id))
        for key, queue in list(self.queues.items()):
            if not queue.depth or any(key in w.supports for w in self.workers.values()):
                queue.unserved_since = None
                continue
            if queue.unserved_since is None:
                queue.unserved_since = now
                message = admission.unserved(
                    key, self.offered, self.config.no_worker_timeout, failed=False
                )
                self._out.append(QueueUnserved(queue_label(key), message))
            elif now - queue.unserved_since >= self.config.no_worker_timeout:
                self._fail_unserved(key, now)

    def _accepting_stopped(self, event: AcceptingStopped) -> None:
        self.accepting = False

    def _redeliver(self, channel: Channel, task: TaskRecord, error: ErrorInfo) -> bool:
        """Handle a report that is not the task's outcome; True if handled."""
        if error.kind is ErrorKind.RETURNED:
            self.stats.returned += 1
            self._requeue(channel, task, count=False)
            return True
        if error.kind is ErrorKind.CRASHED:
            self.stats.crashed += 1
            task.crashes += 1
            if task.crashes >= self.config.poison_threshold:
                channel.leased -= 1
                self._poison(channel, task)
            else:
                self._requeue(channel, task)
            return True
        if error.kind is ErrorKind.TIMEOUT:
            # A stuck task is a transient error: run it again, elsewhere if
            # possible, until it has timed out max_timeouts times.
            task.timeouts += 1
            if task.timeouts < self.config.max_timeouts:
                self.stats.timeouts += 1
                self._requeue(channel, task)
                return True
            return False  # delivered as the task's (fatal) outcome
        if error.kind is ErrorKind.ABORTED:
            # The worker dropped it on our IPC; the channel is still alive
            # only after an abort_all during shutdown: run it elsewhere.
            self._requeue(channel, task, count=False)
            return True
        return False

    def _fail_unserved(self, key: QueueKey, now: float) -> None:
        message = admission.unserved(
            key, self.offered, self.config.no_worker_timeout, failed=True
        )
        error = ErrorInfo("UnknownOperation", message, kind=ErrorKind.UNKNOWN_OPERATION)
        for channel in [c for c in self._ready.values() if c.fifos.get(key)]:
            if channel.directive:
                directive = self.directives[channel.id]
                directive.fail(Code.FAILED_PRECONDITION, message)
                self._touched[directive.id] = directive
                continue
            group = Outcomes.Group()
            for task in channel.take_key(key, self.queues):
                group.add(task, b"", error, 0.0)
            if not channel.queued:
                del self._ready[channel.id]
            self._deliver(channel, group, now)
        self.queues[key].unserved_since = None
