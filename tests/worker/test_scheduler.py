"""The worker's scheduling core, driven by events alone: no network, no processes.

``Harness`` plays the session: it feeds events, validates the scheduler
after every step, and records what the instructions asked for.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from squire_kernel.retry import After, Exponential, Immediate, RetryStrategy
from worker_service._abort import AbortMemory
from worker_service._model import ErrorKind, Failure, Outcome, TaskSpec, Transient
from worker_service._scheduler import Phase, Scheduler
from worker_service._scheduler_events import (
    AbortAllReceived,
    AbortReceived,
    CancelRunning,
    CloseStream,
    DrainExpired,
    DrainRequested,
    Event,
    ExecutionFinished,
    Instruction,
    PoolCrashed,
    Run,
    SchedulerConfig,
    SendCredit,
    SendResults,
    StreamBroken,
    TasksReceived,
    Tick,
    Wake,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spec(task_id: int, key: str = "rk", *, timeout: float = 0.0) -> TaskSpec:
    return TaskSpec(key, task_id, "echo", 0, b"", b"1", (), 0, task_id, timeout)


def transient(policy: RetryStrategy, task: TaskSpec) -> Transient:
    """What the executor reports for a TransientError raised with ``policy``."""
    return Transient("TransientError", "flaky", policy.delay(task.retries + 1))


class Harness:
    def __init__(self, capacity: int = 2, window: int = 8, occupied: int = 0) -> None:
        self.clock = Clock()
        self.aborted = AbortMemory(60.0, self.clock)
        self.scheduler = Scheduler(
            SchedulerConfig(capacity, window), self.clock, self.aborted, occupied=occupied,
        )
        self.started: list[TaskSpec] = []   # every task handed to the executor, in order
        self.running: list[TaskSpec] = []   # ... and not finished yet
        self.results: dict[tuple[str, int], bytes | Failure] = {}
        self.cancelled: list[TaskSpec] = []
        self.credits: list[int] = []
        self.wake: float | None = None
        self.closed = False

    def __call__(self, *events: Event) -> list[Instruction]:
        out = self.scheduler.handle(*events)
        self.scheduler.validate()
        for instruction in out:
            match instruction:
                case Run(tasks):
                    self.started.extend(tasks)
                    self.running.extend(tasks)
                case SendResults(results):
                    assert not self.closed, "sent after the stream was closed"
                    for task, outcome in results:
                        key = (task.routing_key, task.task_id)
                        assert key not in self.results, f"{key} reported twice"
                        self.results[key] = outcome
                case CancelRunning(tasks):
                    self.cancelled.extend(tasks)
                case Wake(at):
                    self.wake = at
                case SendCredit(window):
                    self.credits.append(window)
                case CloseStream():
                    self.closed = True
        return out

    def receive(self, *tasks: TaskSpec) -> list[Instruction]:
        return self(TasksReceived(tasks))

    def finish(self, task: TaskSpec, outcome: Outcome = b"ok", seconds: float = 0.01) -> None:
        self.running.remove(task)
        self(ExecutionFinished([(task, outcome, seconds)]))

    def tick(self, to: float) -> None:
        self.clock.now = to
        self.wake = None  # a Tick spends the wake-up asked for
        self(Tick())

    def outcome(self, task: TaskSpec) -> bytes | Failure:
        return self.results[(task.routing_key, task.task_id)]

    def kind(self, task: TaskSpec) -> ErrorKind:
        outcome = self.outcome(task)
        assert isinstance(outcome, Failure), outcome
        return outcome.kind


# --------------------------------------------------------------- capacity, FIFO

def test_at_most_capacity_run_and_the_fifo_order_is_kept() -> None:
    h = Harness(capacity=2)
    tasks = [spec(i) for i in range(5)]
    h.receive(*tasks)
    assert h.started == tasks[:2] and h.scheduler.buffered == 3
    h.finish(tasks[1])
    assert h.started == tasks[:3]
    h.finish(tasks[0])
    h.finish(tasks[2])
    assert h.started == tasks[:5]
    for task in tasks[3:]:
        h.finish(task)
    assert h.started == tasks and h.running == []
    assert set(h.results.values()) == {b"ok"} and len(h.results) == 5


def test_a_whole_batch_is_one_run_and_its_results_one_send() -> None:
    # The inline executor's shape: one Run for the batch, one ExecutionFinished
    # for all of it, one SendResults for all of that.
    h = Harness(capacity=100)
    tasks = [spec(i) for i in range(50)]
    [run] = [i for i in h.receive(*tasks) if isinstance(i, Run)]
    assert list(run.tasks) == tasks
    out = h(ExecutionFinished([(t, b"ok", 0.001) for t in tasks]))
    sends = [i for i in out if isinstance(i, SendResults)]
    assert len(sends) == 1 and [t for t, _ in sends[0].results] == tasks
    assert all(t.elapsed == 0.001 for t in tasks)


def test_slots_of_earlier_sessions_count_until_their_runs_end() -> None:
    h = Harness(capacity=2, occupied=1)
    a, b = spec(1), spec(2)
    h.receive(a, b)
    assert h.started == [a]
    stranger = spec(99, "old")
    h(ExecutionFinished([(stranger, b"ok", 1.0)]))  # an earlier session's run ended
    assert h.started == [a, b]
    assert ("old", 99) not in h.results  # never reported on this stream


def test_the_executor_reports_a_new_capacity_with_its_results() -> None:
    # The process executor's capacity grows once it learns its tasks are cheap.
    h = Harness(capacity=1)
    tasks = [spec(i) for i in range(6)]
    h.receive(*tasks)
    assert h.started == tasks[:1]
    h.running.remove(tasks[0])
    h(ExecutionFinished([(tasks[0], b"ok", 0.001)], capacity=4))
    assert h.started == tasks[:5]
    # It shrinks no lower than the slots taken; nothing more starts meanwhile.
    h.running.remove(tasks[1])
    h(ExecutionFinished([(tasks[1], b"ok", 0.5)], capacity=3))
    assert h.started == tasks[:5]
    h.running.remove(tasks[2])
    h(ExecutionFinished([(tasks[2], b"ok", 0.5)], capacity=3))
    assert h.started == tasks


def test_tasks_handed_back_unstarted_go_first_without_blame_or_retry() -> None:
    h = Harness(capacity=4)
    tasks = [spec(i) for i in range(6)]
    h.receive(*tasks)
    h.running.remove(tasks[1])
    h.running.remove(tasks[2])
    # No room in any child (or theirs died): back to the FIFO's head, in order.
    h(ExecutionFinished([], capacity=2, returned=[tasks[1], tasks[2]]))
    assert h.started == tasks[:4] and not h.results
    assert h.scheduler.buffered == 4
    h.finish(tasks[0])
    assert h.started[4:] == [tasks[1]]
    assert all(t.retries == 0 and not t.suspect for t in tasks)


def test_tasks_handed_back_while_draining_or_aborted_are_reported() -> None:
    h = Harness(capacity=4)
    a, b = spec(1, "a"), spec(1, "b")
    h.receive(a, b)
    h(AbortReceived(["a"]))
    h.running.remove(a)
    h(ExecutionFinished([], returned=[a]))
    assert h.kind(a) == ErrorKind.ABORTED
    h(DrainRequested(5.0))
    h.running.remove(b)
    h(ExecutionFinished([], returned=[b]))
    assert h.kind(b) == ErrorKind.RETURNED and h.closed


def test_more_than_the_window_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(capacity=1, window=2)
    with caplog.at_level(logging.WARNING, "worker_service.scheduler"):
        h.receive(spec(1), spec(2), spec(3))
        h.receive(spec(4))
    assert sum("credit window" in r.message for r in caplog.records) == 1
    assert h.scheduler.buffered == 3


# ------------------------------------------------------------------- retries

def test_immediate_retries_run_again_at_once_then_run_out() -> None:
    h = Harness(capacity=1)
    a, b = spec(1), spec(2)
    h.receive(a, b)
    policy = Immediate(max_retries=2)
    for retry in (1, 2):
        h.finish(a, transient(policy, a))
        assert h.running == [a] and a.retries == retry  # ahead of b
    h.finish(a, transient(policy, a))
    outcome = h.outcome(a)
    assert isinstance(outcome, Failure) and outcome.retries_exhausted
    assert (outcome.kind, outcome.retries, outcome.error_type) == (
        ErrorKind.OPERATION, 2, "TransientError",
    )
    assert h.running == [b]


def test_a_delayed_retry_holds_no_slot_and_runs_when_due() -> None:
    h = Harness(capacity=1)
    a, b = spec(1), spec(2)
    h.receive(a, b)
    policy = After(max_retries=1, delay_seconds=1.5)
    h.finish(a, transient(policy, a), seconds=0.2)
    assert h.running == [b] and h.wake == pytest.approx(101.5)
    assert h.scheduler.buffered == 1
    h.tick(101.4)  # early: nothing is due yet, the wake-up is asked for again
    assert h.running == [b] and h.wake == pytest.approx(101.5)
    h.tick(101.5)
    assert h.running == [b]  # due, but the one slot is taken
    h.finish(b)
    assert h.running == [a]
    h.finish(a, b"ok", seconds=0.3)
    assert h.outcome(a) == b"ok"
    assert a.retries == 1 and a.elapsed == pytest.approx(0.5)  # the wait is no execution
    assert h.wake is None


def test_exponential_backoff_doubles_until_past_its_maximum() -> None:
    h = Harness(capacity=1)
    a = spec(1)
    h.receive(a)
    policy = Exponential(min_delay=0.1, max_delay=0.4)
    waits = []
    while True:
        h.finish(a, transient(policy, a))
        if h.wake is None:
            break
        waits.append(round(h.wake - h.clock.now, 6))
        h.tick(h.wake)
    assert waits == [0.1, 0.2, 0.4]
    outcome = h.outcome(a)
    assert isinstance(outcome, Failure) and outcome.retries_exhausted and outcome.retries == 3


# -------------------------------------------------------------------- aborts

def test_abort_drops_queued_and_waiting_tasks_and_signals_running_ones() -> None:
    h = Harness(capacity=2)
    running, flaky, queued, other = spec(1, "a"), spec(2, "a"), spec(3, "a"), spec(1, "b")
    h.receive(running, flaky, queued, other)
    h.finish(flaky, transient(After(3, 5.0), flaky))  # waits to retry
    assert h.running == [running, queued]
    h.finish(queued)  # (so that ``queued`` below is a fresh one)
    queued = spec(4, "a")
    h.receive(queued)
    assert h.running == [running, other]
    h(AbortReceived(["a"]))
    assert h.kind(flaky) == h.kind(queued) == ErrorKind.ABORTED
    assert h.cancelled == [running] and h.wake is None
    h.finish(running, b"stopped early")  # a running task reports however it ends
    assert h.outcome(running) == b"stopped early"
    late = spec(5, "a")
    h.receive(late)  # remembered: dropped without running
    assert h.kind(late) == ErrorKind.ABORTED and late not in h.started
    h.finish(other)
    assert h.outcome(other) == b"ok"


def test_a_transient_failure_of_an_aborted_key_is_not_retried() -> None:
    h = Harness(capacity=1)
    a = spec(1, "a")
    h.receive(a)
    h(AbortReceived(["a"]))
    h.finish(a, transient(Immediate(3), a))
    assert h.kind(a) == ErrorKind.ABORTED


def test_abort_all_aborts_every_key_held() -> None:
    h = Harness(capacity=1)
    a, b, c = spec(1, "a"), spec(1, "b"), spec(1, "c")
    h.receive(a, b, c)
    h(AbortAllReceived())
    assert h.kind(b) == h.kind(c) == ErrorKind.ABORTED and h.cancelled == [a]
    assert all(h.aborted.is_aborted(k) for k in "abc")
    assert not h.aborted.is_aborted("d")


def test_aborted_keys_are_forgotten_after_the_abort_memory() -> None:
    h = Harness()
    h(AbortReceived(["k"]))
    h.clock.now += 61
    task = spec(1, "k")
    h.receive(task)
    assert h.running == [task]


# -------------------------------------------------------------------- drain

def test_drain_returns_what_waits_finishes_what_runs_then_closes() -> None:
    h = Harness(capacity=1)
    a, b, c = spec(1), spec(2), spec(3)
    h.receive(a, b, c)
    h.finish(a, transient(After(1, 9.0), a))  # waits; b runs now
    out = h(DrainRequested(5.0))
    assert isinstance(out[0], SendCredit) and h.credits == [0]
    assert h.kind(a) == h.kind(c) == ErrorKind.RETURNED
    assert not h.closed and h.scheduler.phase is Phase.DRAINING
    late = spec(4)
    h.receive(late)
    assert h.kind(late) == ErrorKind.RETURNED
    h.finish(b)
    assert h.outcome(b) == b"ok" and h.closed and h.wake is None
    # Closed: what still arrives can be sent nowhere; it is simply dropped.
    assert h.receive(spec(5)) == []
    assert ("rk", 5) not in h.results


def test_a_transient_failure_while_draining_is_returned() -> None:
    h = Harness(capacity=1)
    a = spec(1)
    h.receive(a)
    h(DrainRequested(5.0))
    h.finish(a, transient(Immediate(3), a))
    assert h.kind(a) == ErrorKind.RETURNED and h.closed


def test_the_drain_deadline_hands_back_what_still_runs() -> None:
    h = Harness(capacity=1)
    a = spec(1)
    h.receive(a)
    h(DrainRequested(2.0))
    assert h.wake == pytest.approx(102.0)
    h.tick(102.0)
    assert h.kind(a) == ErrorKind.RETURNED and h.cancelled == [a] and h.closed
    h.finish(a)  # its run ends after all: its slot is free, nothing is sent
    assert h.kind(a) == ErrorKind.RETURNED


def test_an_expired_drain_hands_back_at_once() -> None:
    h = Harness(capacity=2)
    a, b = spec(1), spec(2)
    h.receive(a, b)
    h(DrainRequested(30.0))
    h(DrainExpired())
    assert h.kind(a) == h.kind(b) == ErrorKind.RETURNED and h.closed


def test_a_drain_with_nothing_running_closes_at_once() -> None:
    h = Harness()
    h(DrainRequested(30.0))
    assert h.credits == [0] and h.closed and h.wake is None
    h(DrainRequested(30.0))  # idempotent
    assert h.credits == [0]


# ---------------------------------------------------------------- timeouts

def test_a_run_past_its_timeout_is_reported_and_keeps_its_slot_until_it_ends() -> None:
    h = Harness(capacity=1)
    slow, after = spec(1, timeout=0.5), spec(2)
    h.receive(slow, after)
    assert h.wake == pytest.approx(100.5)
    h.tick(100.5)
    outcome = h.outcome(slow)
    assert isinstance(outcome, Failure) and outcome.kind is ErrorKind.TIMEOUT
    assert h.cancelled == [slow] and slow.elapsed == pytest.approx(0.5)
    assert h.running == [slow]  # still in the executor: ``after`` must wait
    h.finish(slow, b"too late")
    assert h.running == [after] and h.kind(slow) == ErrorKind.TIMEOUT


def test_a_run_that_returns_past_its_timeout_is_timed_out() -> None:
    # An inline run cannot be interrupted: it is judged when it returns.
    h = Harness()
    a = spec(1, timeout=0.05)
    h.receive(a)
    h.finish(a, b"ok", seconds=0.2)
    assert h.kind(a) == ErrorKind.TIMEOUT


# -------------------------------------------------------------- pool crashes

def _crash(h: Harness, *tasks: TaskSpec, shared: bool | None = None) -> None:
    for task in tasks:
        h.running.remove(task)
    h(PoolCrashed(
        [(t, 0.1) for t in tasks], len(tasks) > 1 if shared is None else shared,
        "BrokenProcessPool",
    ))


def test_a_crash_alone_is_reported_crashed() -> None:
    h = Harness()
    a = spec(1)
    h.receive(a)
    _crash(h, a)
    outcome = h.outcome(a)
    assert isinstance(outcome, Failure)
    assert (outcome.kind, outcome.error_type) == (ErrorKind.CRASHED, "BrokenProcessPool")


def test_tasks_of_a_shared_crash_run_again_alone_and_only_the_culprit_is_blamed() -> None:
    h = Harness(capacity=3)
    innocent, poison, other, queued = spec(1, "a"), spec(1, "p"), spec(1, "b"), spec(2, "b")
    h.receive(innocent, poison, other, queued)
    h.finish(other)
    _crash(h, innocent, poison, queued)
    assert not h.results.keys() - {("b", 1)}  # nobody blamed yet
    assert h.running == [innocent]  # alone, though two slots are free
    h.finish(innocent)
    assert h.running == [poison]
    _crash(h, poison)
    assert h.kind(poison) == ErrorKind.CRASHED
    assert h.running == [queued]
    h.finish(queued)
    assert h.outcome(innocent) == h.outcome(queued) == b"ok"


def test_a_suspect_waits_for_the_pool_to_empty() -> None:
    h = Harness(capacity=2)
    a, b, c = spec(1), spec(2), spec(3)
    h.receive(a, b)
    _crash(h, a, shared=True)  # b still runs (its report comes separately)
    assert h.running == [b]
    h.receive(c)
    assert h.running == [b]  # c queues behind the suspect
    h.finish(b)
    assert h.running == [a]
    h.finish(a)
    assert h.running == [c]


def test_a_shared_crash_while_draining_or_aborted_is_not_run_again() -> None:
    h = Harness(capacity=3)
    a, b, c = spec(1, "a"), spec(1, "b"), spec(1, "c")
    h.receive(a, b, c)
    h(AbortReceived(["a"]))
    _crash(h, a, b)
    assert h.kind(a) == ErrorKind.ABORTED and h.running == [c]
    assert h.scheduler.buffered == 1  # b, to run alone
    h(DrainRequested(5.0))
    assert h.kind(b) == ErrorKind.RETURNED
    _crash(h, c, shared=True)
    assert h.kind(c) == ErrorKind.RETURNED and h.closed


# ------------------------------------------------------------- broken stream

def test_a_broken_stream_hands_over_what_runs_and_what_was_not_sent() -> None:
    h = Harness(capacity=1)
    a, b, c = spec(1), spec(2), spec(3)
    h.receive(a, b, c)
    h.finish(a, transient(After(2, 1.0), a))
    assert h.wake is not None
    out = h(ExecutionFinished([(b, b"ok", 0.1)]), StreamBroken())
    # b's result was not sent on this stream: it goes to the next one. a
    # (waiting for a retry) and c (queued) are re-queued by the orchestrator.
    assert not any(isinstance(i, SendResults) for i in out)
    assert not h.results and h.wake is None
    assert h.scheduler.running == h.scheduler.buffered == 0
    holdover = h.scheduler.holdover
    assert holdover is not None and holdover.reports == [(b, b"ok")] and not holdover.running
    assert h(TasksReceived([spec(4)]), Tick(), DrainRequested(1.0)) == []


def test_running_tasks_run_on_when_the_stream_breaks() -> None:
    h = Harness(capacity=3)
    a, b, slow = spec(1), spec(2, timeout=5.0), spec(3, timeout=1.0)
    h.receive(a, b, slow)
    h.clock.now += 1.0
    h(Tick(), StreamBroken())  # slow times out in the same step
    # Only the timed-out run is signalled; a and b go on for the next stream.
    assert h.cancelled == [slow] and not h.results
    holdover = h.scheduler.holdover
    assert holdover is not None
    assert list(holdover.running) == [a, b] and holdover.detached == {slow}
    assert [(task, type(outcome)) for task, outcome in holdover.reports] == [(slow, Failure)]


def test_the_next_stream_starts_from_the_holdover() -> None:
    old = Harness(capacity=3)
    a, b, slow = spec(1), spec(2, timeout=5.0), spec(3, timeout=1.0)
    old.receive(a, b, slow)
    old.clock.now += 1.0
    old(Tick(), StreamBroken())
    holdover = old.scheduler.holdover
    assert holdover is not None

    h = Harness(capacity=3)
    h.clock.now = old.clock.now
    h.scheduler = Scheduler(
        SchedulerConfig(3, 8), h.clock, h.aborted, holdover=holdover,
    )
    h.scheduler.validate()
    assert h.scheduler.slots_taken == 3  # a and b run, slow's run has not ended
    h.receive(spec(4))  # no free slot: it waits
    assert h.results[("rk", 3)].kind is ErrorKind.TIMEOUT  # carried, sent first
    assert h.started == [] and h.scheduler.buffered == 1
    h(ExecutionFinished([(a, b"a", 1.5)]))  # a carried run ends: reported here
    assert h.results[("rk", 1)] == b"a"
    assert [t.task_id for t in h.started] == [4]
    h.clock.now += 4.0  # b's deadline (5 s from its start) passes on this stream
    h(Tick())
    assert h.results[("rk", 2)].kind is ErrorKind.TIMEOUT


# ----------------------------------------------------------------- layering

def test_the_core_imports_no_io() -> None:
    """The scheduler and everything of worker_service it imports, transitively,
    import nothing from grpc, asyncio, socket or time."""
    package = Path(__file__).resolve().parents[2] / "worker_service"
    forbidden = {"grpc", "asyncio", "socket", "time", "squire", "concurrent", "threading"}
    seen: set[str] = set()
    todo = ["_scheduler"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            for module in modules:
                assert module.split(".")[0] not in forbidden, f"{name} imports {module}"
                if module.startswith("worker_service."):
                    todo.append(module.split(".")[1])
    assert {"_scheduler", "_scheduler_events", "_model", "_abort"} <= seen
