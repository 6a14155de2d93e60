"""The routing core: channels, task queues, worker leases, dispatch. No I/O.

The servicer feeds it events (a worker connected, results arrived, a client
published tasks, time passed) and drains its outputs: each ``Worker`` has an
outbox of tasks and worker IPC, each ``Channel`` a deque of results, each
``Directive`` its emitted items. When a public method adds output to one of
them it calls that object's ``notify`` hook (the servicer sets it to wake the
coroutine that writes the stream). Time comes from the injected ``clock``.

Invariants (asserted by the unit tests):
- a task is in exactly one place: a queue, one worker's lease table, or done;
- a worker holds at most ``window`` unreported tasks (credit flow control);
- a task goes only to a worker that offers its operation (or monoid);
- a result is accepted once, from the worker holding the task's lease;
  anything else is dropped and counted as a duplicate.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from orchestrator_service._directive import MAX_TAKE_BYTES, Directive, DirectiveState
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    ChannelResult,
    Code,
    ErrorInfo,
    ErrorKind,
    OkResult,
    PlanSpec,
    QueueKey,
    ResultEvent,
    RouterConfig,
    RouterError,
    TaskRecord,
    WorkerHello,
)

Notify = Callable[[], None]


@dataclass(frozen=True, slots=True)
class IpcMessage:
    kind: str  # "execution_failed" | "abort" | "abort_all" | "drain"
    routing_key: str = ""
    message: str = ""


@dataclass(slots=True)
class Stats:
    """Monotonic counters; the metrics collector reads them when scraped."""

    published: int = 0
    dispatched: int = 0
    ok: int = 0
    fatal: int = 0
    ignored: int = 0
    requeued: int = 0
    returned: int = 0
    crashed: int = 0
    duplicates: int = 0
    late: int = 0  # results for a released channel
    dropped: int = 0  # queued tasks dropped by terminate, cancel or release
    ipc_sent: int = 0
    poison: int = 0
    retries: int = 0  # transient-error retries workers made
    timeouts: int = 0  # tasks re-queued after running past their timeout
    cancelled: int = 0  # directives cancelled by their client


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
        self.outbox: list[TaskRecord] = []
        self.ipc: list[IpcMessage] = []
        self.connected_at = now
        self.last_seen = now
        self.completed = 0
        self.lost = False  # the core gave up on it; the servicer must end the stream
        self.notify: Notify | None = None

    @property
    def free(self) -> int:
        return self.window - len(self.leases)


class Channel:
    """A result channel; its id is the routing key of every task published to it."""

    def __init__(self, channel_id: str, now: float) -> None:
        self.id = channel_id
        self.created_at = now
        self.directive: Directive | None = None
        self.sender_closed = False
        self.published = 0
        self.completed = 0
        self.queued = 0
        self.in_flight = 0
        self.next_task_id = 0
        self.pending_ids: set[int] = set()  # external channels: ids without a result yet
        self.results: deque[ChannelResult] = deque()
        # Queued tasks by (kind, operation), served latest directive stage
        # first: finishing elements beats starting new ones (memory, latency).
        self.fifos: dict[QueueKey, deque[TaskRecord]] = {}
        self._priority: dict[QueueKey, int] = {}
        self.notify: Notify | None = None

    def _fifo(self, key: QueueKey, stage: int) -> deque[TaskRecord]:
        fifo = self.fifos.get(key)
        if fifo is None:
            fifo = self.fifos[key] = deque()
            # fold tasks (stage < 0) outrank every map stage
            self._priority[key] = stage if stage >= 0 else 1 << 30
            if len(self.fifos) > 1:
                self.fifos = dict(
                    sorted(self.fifos.items(), key=lambda kv: -self._priority[kv[0]])
                )
        return fifo

    def push(self, task: TaskRecord, *, front: bool = False) -> None:
        fifo = self._fifo(task.queue_key, task.stage)
        if front:
            fifo.appendleft(task)
        else:
            fifo.append(task)
        self.queued += 1

    def push_many(self, key: QueueKey, tasks: list[TaskRecord]) -> None:
        """Tasks of one key and one stage, to the back of their fifo."""
        self._fifo(key, tasks[0].stage).extend(tasks)
        self.queued += len(tasks)

    def take(
        self, supports: frozenset[QueueKey], n: int, depths: dict[QueueKey, OpDepth]
    ) -> list[TaskRecord]:
        """Up to ``n`` queued tasks a worker supports; ``depths`` is kept in step."""
        taken: list[TaskRecord] = []
        for key, fifo in self.fifos.items():
            if fifo and key in supports:
                k = min(n - len(taken), len(fifo))
                if k == len(fifo):
                    taken.extend(fifo)
                    fifo.clear()
                else:
                    popleft = fifo.popleft
                    taken.extend([popleft() for _ in range(k)])
                depths[key].depth -= k
                if len(taken) >= n:
                    break
        self.queued -= len(taken)
        return taken

    def drop_queued(self) -> dict[QueueKey, int]:
        dropped = {key: len(fifo) for key, fifo in self.fifos.items() if fifo}
        self.fifos.clear()
        self.queued = 0
        return dropped

    @property
    def drained(self) -> bool:
        """The sender is closed and every published task's result was taken."""
        return self.sender_closed and self.completed == self.published and not self.results

    def wake(self) -> None:
        if self.notify is not None:
            self.notify()


class OpDepth:
    """Queued tasks of one (kind, operation) across channels, and since when
    no connected worker offers it."""

    __slots__ = ("depth", "unserved_since")

    def __init__(self) -> None:
        self.depth = 0
        self.unserved_since: float | None = None


class Router:
    """The orchestrator's Runtime core: feed it events, drain its outboxes."""

    def __init__(
        self, config: RouterConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or RouterConfig()
        self.clock = clock
        self.workers: dict[str, Worker] = {}
        self.channels: dict[str, Channel] = {}
        self.queues: dict[QueueKey, OpDepth] = {}
        # channels with queued tasks, in round-robin order
        self._ready: dict[str, Channel] = {}
        self.stats = Stats()
        self.accepting = True
        # Optional observer of the tasks that reached their outcome, with the
        # time they did (metrics); called once per batch of results.
        self.on_tasks_done: Callable[[list[TaskRecord], float], None] | None = None
        self._lease_ids = itertools.count(1)
        self._dispatch_needed = False
        self._worker_rotation = 0

    # ============================================================= workers

    def connect_worker(self, hello: WorkerHello) -> Worker:
        if not hello.worker_id:
            raise RouterError(Code.INVALID_ARGUMENT, "worker hello has an empty worker_id")
        if not hello.operations and not hello.monoids:
            raise RouterError(
                Code.INVALID_ARGUMENT,
                f"worker {hello.worker_id!r} offers no operations and no monoids",
            )
        if hello.capacity < 1:
            raise RouterError(
                Code.INVALID_ARGUMENT, f"worker {hello.worker_id!r} has capacity 0"
            )
        if hello.worker_id in self.workers:
            raise RouterError(
                Code.ALREADY_EXISTS, f"a worker with id {hello.worker_id!r} is already connected"
            )
        if len(self.workers) >= self.config.max_workers:
            raise RouterError(
                Code.RESOURCE_EXHAUSTED,
                f"max_workers limit reached ({self.config.max_workers} connected)",
            )
        worker = Worker(hello, self.clock())
        self.workers[worker.id] = worker
        self._dispatch_needed = True
        self._pump()
        return worker

    def disconnect_worker(self, worker: Worker) -> None:
        """The worker's stream ended (or it was declared lost): re-queue its leases."""
        if self.workers.get(worker.id) is not worker:
            return
        del self.workers[worker.id]
        running = worker.hello.capacity
        for position, task in enumerate(worker.leases.values()):
            channel = self.channels.get(task.routing_key)
            if channel is None:
                continue
            channel.in_flight -= 1
            # Only the first `capacity` tasks were executing; count the loss
            # against them, so a task that keeps killing workers becomes poison.
            if position < running:
                task.crashes += 1
                if task.crashes >= self.config.poison_threshold:
                    self._poison(channel, task)
                    continue
            self._requeue(channel, task)
        worker.leases.clear()
        worker.outbox.clear()
        self._dispatch_needed = True
        self._pump()

    def heartbeat(self, worker: Worker) -> None:
        worker.last_seen = self.clock()

    def set_window(self, worker: Worker, window: int) -> None:
        worker.last_seen = self.clock()
        worker.window = window
        self._dispatch_needed = True
        self._pump()

    def drain_workers(self, grace_seconds: float) -> None:
        for worker in self.workers.values():
            self._send_ipc(worker, IpcMessage("drain", message=f"{grace_seconds:g}"))

    def on_results(
        self,
        worker: Worker,
        events: Iterable[ResultEvent] = (),
        outputs: Iterable[OkResult] = (),
    ) -> None:
        """A worker reported results: ``outputs`` are plain successes
        (``ExecutionOk`` with no retries), ``events`` everything else."""
        now = worker.last_seen = self.clock()
        leases = worker.leases
        pop = leases.pop
        stats = self.stats
        touched: dict[str, Directive] = {}
        # The hot path: successes, grouped by routing key and delivered per
        # group, so per-task work is a lease lookup and two appends.
        groups: dict[str, tuple[list[TaskRecord], list[bytes]]] = {}
        key: str | None = None
        tasks: list[TaskRecord] = []
        outs: list[bytes] = []
        done = 0
        for lease_id, task_id, output in outputs:
            task = pop(lease_id, None)
            if task is None or task.task_id != task_id:
                if task is not None:  # not this lease's task: keep the live lease
                    leases[lease_id] = task
                stats.duplicates += 1
                continue
            if task.routing_key is not key:
                key = task.routing_key
                group = groups.get(key)
                if group is None:
                    group = groups[key] = ([], [])
                tasks, outs = group
            tasks.append(task)
            outs.append(output)
        for key, (tasks, outs) in groups.items():
            done += len(tasks)
            channel = self.channels.get(key)
            if channel is None:
                stats.late += len(tasks)
                continue
            channel.in_flight -= len(tasks)
            self._deliver_outputs(channel, tasks, outs, now)
            if channel.directive is not None:
                touched[key] = channel.directive
        for event in events:
            task = pop(event.lease_id, None)
            if task is None or task.task_id != event.task_id:
                if task is not None:
                    leases[event.lease_id] = task
                stats.duplicates += 1
                continue
            done += 1
            if event.retries:
                stats.retries += event.retries
            channel = self.channels.get(task.routing_key)
            if channel is None:
                stats.late += 1
                continue
            channel.in_flight -= 1
            error = event.error
            if error is not None and self._redeliver(channel, task, error):
                continue
            if self.on_tasks_done is not None:
                self.on_tasks_done([task], now)
            directive = channel.directive
            if directive is not None:
                directive.retries += event.retries
                touched[channel.id] = directive
            self._deliver(channel, task, event.output, error)
        if done:
            worker.completed += done
            self._dispatch_needed = True
        for directive in touched.values():
            directive.advance()
        self._pump()

    # ============================================================ channels

    def lease_channel(self) -> Channel:
        self._check_accepting()
        # 128 random bits, as hex: the id is the capability to use the
        # channel (uuid4().hex is the same, five times slower).
        channel = Channel(os.urandom(16).hex(), self.clock())
        self.channels[channel.id] = channel
        return channel

    def channel(self, channel_id: str) -> Channel:
        channel = self.channels.get(channel_id)
        if channel is None:
            raise RouterError(
                Code.NOT_FOUND, f"unknown channel id {channel_id!r} (never leased or released)"
            )
        return channel

    def publish(self, channel_id: str, tasks: list[TaskRecord]) -> None:
        """Queue client tasks on an external channel; all or none are accepted."""
        channel = self.channel(channel_id)
        if channel.directive is not None:
            raise RouterError(
                Code.FAILED_PRECONDITION,
                f"channel {channel_id!r} belongs to a directive; publish through RunDirective",
            )
        if channel.sender_closed:
            raise RouterError(
                Code.FAILED_PRECONDITION, f"channel {channel_id!r} is closed for publishing"
            )
        # A hard cap next to the publish backpressure: results nobody takes
        # would otherwise pile up without bound.
        pending = len(channel.pending_ids) + len(channel.results)
        if pending + len(tasks) > self.config.max_pending_per_channel:
            raise RouterError(
                Code.RESOURCE_EXHAUSTED,
                f"max_pending_per_channel limit reached: channel {channel_id!r} holds {pending} "
                f"tasks without a taken result and {len(tasks)} more would pass "
                f"{self.config.max_pending_per_channel}; take results before publishing more",
            )
        seen: set[int] = set()
        for task in tasks:
            if not task.operation:
                raise RouterError(
                    Code.INVALID_ARGUMENT, f"task {task.task_id}: operation is empty"
                )
            if task.kind not in (APPLY, COMBINE):
                raise RouterError(
                    Code.INVALID_ARGUMENT, f"task {task.task_id}: unknown task kind {task.kind}"
                )
            if task.task_id in channel.pending_ids or task.task_id in seen:
                raise RouterError(
                    Code.INVALID_ARGUMENT,
                    f"task id {task.task_id} is already pending on channel {channel_id!r}",
                )
            seen.add(task.task_id)
        channel.pending_ids |= seen
        for task in tasks:
            task.routing_key = channel.id
            self.enqueue(channel, task)
        self._pump()

    def can_publish(self, channel: Channel) -> bool:
        return channel.queued < self.config.max_queued_per_channel

    def close_channel(self, channel_id: str) -> None:
        channel = self.channel(channel_id)
        channel.sender_closed = True
        channel.wake()

    def take_results(self, channel: Channel, limit: int) -> list[ChannelResult]:
        """Up to ``limit`` results and ``MAX_TAKE_BYTES`` of outputs (one larger goes alone)."""
        out: list[ChannelResult] = []
        results = channel.results
        size = 0
        while results and len(out) < limit:
            size += len(results[0].output)
            if size > MAX_TAKE_BYTES and out:
                break
            out.append(results.popleft())
        return out

    def release_channel(self, channel_id: str) -> None:
        channel = self.channel(channel_id)
        if channel.directive is not None:
            self.cancel_directive(channel.directive)
            return
        self._terminate(channel, IpcMessage("abort", channel.id))
        self._release(channel.id)
        channel.sender_closed = True
        channel.results.clear()
        channel.wake()

    # ========================================================== directives

    def start_directive(self, plan: PlanSpec) -> Directive:
        self._validate_plan(plan)
        channel = self.lease_channel()
        directive = Directive(self, channel, plan, self.clock())
        channel.directive = directive
        return directive

    def directive_inputs(self, directive: Directive, items: list[bytes]) -> None:
        directive.add_inputs(items, self.clock())
        directive.advance()
        self._pump()

    def directive_input_end(self, directive: Directive) -> None:
        directive.end_input()
        directive.advance()
        self._pump()

    def cancel_directive(self, directive: Directive) -> None:
        """The client went away or cancelled: drop, abort, release."""
        if directive.finished:
            self._release(directive.id)
            return
        directive.cancel()
        self.stats.cancelled += 1
        channel = self.channels.get(directive.id)
        if channel is not None:
            self._terminate(channel, IpcMessage("abort", directive.id))

    def fail_directive(self, directive: Directive, code: Code, message: str) -> None:
        directive.fail(code, message)
        channel = self.channels.get(directive.id)
        if channel is not None:
            self.stats.fatal += 1
            self._terminate(channel, IpcMessage("execution_failed", directive.id, message))

    def directive_finished(self, directive: Directive) -> None:
        """Called by a directive that produced its last result."""
        if directive.state is DirectiveState.DONE:
            self._release(directive.id)

    # ================================================================ time

    def tick(self) -> list[Worker]:
        """Expire silent workers and unservable queues; returns the workers
        declared lost, whose streams the servicer must end."""
        now = self.clock()
        lost = [
            w for w in self.workers.values() if now - w.last_seen > self.config.lease_timeout
        ]
        for worker in lost:
            worker.lost = True
            self.disconnect_worker(worker)
            if worker.notify is not None:
                worker.notify()
        for key, queue in list(self.queues.items()):
            if not queue.depth or any(key in w.supports for w in self.workers.values()):
                queue.unserved_since = None
                continue
            if queue.unserved_since is None:
                queue.unserved_since = now
            elif now - queue.unserved_since >= self.config.no_worker_timeout:
                self._fail_unserved(key)
        self._pump()
        return lost

    # ============================================================ internal

    def enqueue(self, channel: Channel, task: TaskRecord) -> None:
        task.published_at = self.clock()
        self._push(channel, task)
        channel.published += 1
        self.stats.published += 1
        self._dispatch_needed = True

    def enqueue_many(self, channel: Channel, key: QueueKey, tasks: list[TaskRecord]) -> None:
        """``enqueue`` for tasks of one queue key and one stage, in one go
        (their ``published_at`` already set)."""
        if not tasks:
            return
        channel.push_many(key, tasks)
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = OpDepth()
        queue.depth += len(tasks)
        if channel.id not in self._ready:
            self._ready[channel.id] = channel
        channel.published += len(tasks)
        self.stats.published += len(tasks)
        self._dispatch_needed = True

    def _pump(self) -> None:
        """Fill every worker's free credit, serving channels round-robin
        (``fairness_quantum`` tasks per turn) so directives share fairly."""
        if not self._dispatch_needed:
            return
        self._dispatch_needed = False
        workers = list(self.workers.values())
        if not workers or not self._ready:
            return
        # Rotate who is served first so equal workers share a small backlog.
        self._worker_rotation = (self._worker_rotation + 1) % len(workers)
        workers = workers[self._worker_rotation :] + workers[: self._worker_rotation]
        quantum = self.config.fairness_quantum
        ready = self._ready
        for worker in workers:
            free = worker.free
            if free <= 0 or worker.lost:
                continue
            sent = 0
            progressed = True
            while free > 0 and progressed and ready:
                progressed = False
                # With one channel ready there is nobody to be fair to.
                turn = quantum if len(ready) > 1 else free
                for channel in list(ready.values()):
                    tasks = channel.take(worker.supports, min(free, turn), self.queues)
                    if not tasks:
                        continue
                    progressed = True
                    del ready[channel.id]
                    if channel.queued:
                        ready[channel.id] = channel  # to the back of the round
                    self._lease(worker, channel, tasks)
                    sent += len(tasks)
                    free -= len(tasks)
                    if free <= 0:
                        break
            if sent:
                self.stats.dispatched += sent
                if worker.notify is not None:
                    worker.notify()

    def _lease(self, worker: Worker, channel: Channel, tasks: list[TaskRecord]) -> None:
        lease_ids = self._lease_ids
        leases = worker.leases
        for task in tasks:
            task.attempt += 1
            lease_id = task.lease_id = next(lease_ids)
            leases[lease_id] = task
        worker.outbox.extend(tasks)
        channel.in_flight += len(tasks)

    def _push(self, channel: Channel, task: TaskRecord, *, front: bool = False) -> None:
        channel.push(task, front=front)
        queue = self.queues.get(task.queue_key)
        if queue is None:
            queue = self.queues[task.queue_key] = OpDepth()
        queue.depth += 1
        if channel.id not in self._ready:
            self._ready[channel.id] = channel
        self._dispatch_needed = True

    def _redeliver(self, channel: Channel, task: TaskRecord, error: ErrorInfo) -> bool:
        """Handle reports that are not the task's outcome; True if handled."""
        if error.kind is ErrorKind.RETURNED:
            self.stats.returned += 1
            self._requeue(channel, task, count=False)
            return True
        if error.kind is ErrorKind.CRASHED:
            self.stats.crashed += 1
            task.crashes += 1
            if task.crashes >= self.config.poison_threshold:
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
            # The worker dropped it on our IPC; the channel may still be
            # alive only for an abort_all during shutdown: run it elsewhere.
            if channel.directive is None or not channel.directive.finished:
                self._requeue(channel, task, count=False)
            return True
        return False

    def _deliver(
        self, channel: Channel, task: TaskRecord, output: bytes, error: ErrorInfo | None
    ) -> None:
        if error is None:
            self.stats.ok += 1
        elif error.strategy == 1:
            self.stats.ignored += 1
        channel.completed += 1
        directive = channel.directive
        if directive is not None:
            directive.on_result(task, output, error)
        else:
            channel.pending_ids.discard(task.task_id)
            channel.results.append(ChannelResult(task, output, error))
            channel.wake()

    def _deliver_outputs(
        self, channel: Channel, tasks: list[TaskRecord], outputs: list[bytes], now: float
    ) -> None:
        """``_deliver`` for a batch of successes of one channel."""
        self.stats.ok += len(tasks)
        channel.completed += len(tasks)
        if self.on_tasks_done is not None:
            self.on_tasks_done(tasks, now)
        directive = channel.directive
        if directive is not None:
            directive.on_outputs(tasks, outputs)
            return
        pending = channel.pending_ids
        results = channel.results
        for task, output in zip(tasks, outputs, strict=True):
            pending.discard(task.task_id)
            results.append(ChannelResult(task, output, None))
        channel.wake()

    def _requeue(self, channel: Channel, task: TaskRecord, *, count: bool = True) -> None:
        task.lease_id = 0
        self._push(channel, task, front=True)  # first in line: it has waited longest
        if count:
            self.stats.requeued += 1
        self._dispatch_needed = True

    def _poison(self, channel: Channel, task: TaskRecord) -> None:
        self.stats.poison += 1
        message = (
            f"poison task: task {task.task_id} ({task.operation!r}) killed its worker "
            f"{task.crashes} times"
        )
        self._deliver(
            channel,
            task,
            b"",
            ErrorInfo("PoisonTask", message, kind=ErrorKind.CRASHED),
        )

    def _terminate(self, channel: Channel, ipc: IpcMessage) -> None:
        """Drop the channel's queued tasks and tell every worker to abort its key."""
        self._drop_queued(channel)
        for worker in self.workers.values():
            self._send_ipc(worker, ipc)
        if channel.directive is not None:
            self._release(channel.id)

    def _release(self, channel_id: str) -> None:
        channel = self.channels.pop(channel_id, None)
        if channel is not None:
            self._drop_queued(channel)

    def _drop_queued(self, channel: Channel) -> None:
        for key, n in channel.drop_queued().items():
            self.queues[key].depth -= n
            self.stats.dropped += n
        self._ready.pop(channel.id, None)

    def _send_ipc(self, worker: Worker, ipc: IpcMessage) -> None:
        worker.ipc.append(ipc)
        self.stats.ipc_sent += 1
        if worker.notify is not None:
            worker.notify()

    def _fail_unserved(self, key: QueueKey) -> None:
        kind, name = key
        what = "monoid" if kind == COMBINE else "operation"
        message = (
            f"no connected worker offers {what} {name!r} "
            f"(waited {self.config.no_worker_timeout:g} s)"
        )
        error = ErrorInfo("UnknownOperation", message, kind=ErrorKind.UNKNOWN_OPERATION)
        for channel in [c for c in self._ready.values() if c.fifos.get(key)]:
            if channel.directive is not None:
                self.fail_directive(channel.directive, Code.FAILED_PRECONDITION, message)
                continue
            fifo = channel.fifos.pop(key)
            channel.queued -= len(fifo)
            self.queues[key].depth -= len(fifo)
            if not channel.queued:
                del self._ready[channel.id]
            for task in fifo:
                self._deliver(channel, task, b"", error)
        self.queues[key].unserved_since = None

    def _validate_plan(self, plan: PlanSpec) -> None:
        self._check_accepting()
        if not plan.stages:
            raise RouterError(Code.INVALID_ARGUMENT, "plan has no stages")
        for position, stage in enumerate(plan.stages):
            if not stage.operation:
                raise RouterError(
                    Code.INVALID_ARGUMENT, f"plan stage {position} names no operation"
                )
            if stage.fold and position != len(plan.stages) - 1:
                raise RouterError(
                    Code.INVALID_ARGUMENT,
                    f"plan stage {position}: fold({stage.operation}) must be the last stage",
                )
        fold = plan.fold
        if fold is not None and self.workers:
            workers = self.workers.values()
            offered_as_monoid = any(fold.operation in w.hello.monoids for w in workers)
            offered_as_op = any(fold.operation in w.hello.operations for w in workers)
            if offered_as_op and not offered_as_monoid:
                raise RouterError(
                    Code.INVALID_ARGUMENT,
                    f"fold({fold.operation}): {fold.operation!r} is an operation, not a monoid",
                )

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise RouterError(
                Code.UNAVAILABLE, "the orchestrator is shutting down and takes no new work"
            )

