"""A randomized simulator for the worker's scheduling core.

Each seed plays a few hundred random steps against one executor that
outlives its stream sessions: tasks arrive, runs finish (one by one like a
pool, or all at once like an inline batch), runs come back unstarted with
a new capacity (the process executor), pools crash, keys are aborted,
time passes, drains start and expire, streams break and a new session
takes over the executor. ``validate()`` runs after every step, and the
simulator checks from outside what the session relies on:

- the executor never runs more than ``capacity`` tasks, across sessions,
  and the session counts exactly the slots the executor has taken;
- a task is handed to the executor only when it does not run already;
- each task is reported at most once, only on the session that received
  it, and never after that session's stream closed or broke;
- once a drain has closed the stream, every task received before is
  reported exactly once.
"""

from __future__ import annotations

import random

import pytest

from squire_kernel.retry import After, Exponential, Immediate, RetryStrategy
from worker_service._abort import AbortMemory
from worker_service._model import ErrorKind, Failure, Outcome, TaskSpec, Transient
from worker_service._scheduler import Scheduler
from worker_service._scheduler_events import (
    AbortAllReceived,
    AbortReceived,
    CancelRunning,
    CloseStream,
    DrainExpired,
    DrainRequested,
    Event,
    ExecutionFinished,
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

SEEDS = 200
STEPS = 200
KEYS = "abcdefghij"
POLICIES: list[RetryStrategy] = [Immediate(2), After(2, 0.3), Exponential(0.1, 0.4)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sim:
    def __init__(self, seed: int) -> None:
        rng = self.rng = random.Random(seed)
        self.capacity = rng.choice([1, 2, 3, 8])
        self.window = self.capacity + rng.choice([0, 1, 4])
        self.clock = Clock()
        self.aborted = AbortMemory(rng.choice([0.5, 5.0]), self.clock)
        # The executor's side, across sessions: task -> its retry policy.
        self.in_flight: dict[TaskSpec, RetryStrategy] = {}
        self.next_id = 0
        self.sessions = 0
        self.sent_ever: set[TaskSpec] = set()  # reported on any stream
        self.policies: dict[TaskSpec, RetryStrategy] = {}
        self._new_session()

    def _new_session(self) -> None:
        """The next stream: after a break it starts from the holdover."""
        self.sessions += 1
        holdover = self.scheduler.holdover if self.sessions > 1 else None
        carried: set[TaskSpec] = set()
        occupied = len(self.in_flight)
        if holdover is not None:
            carried = set(holdover.running) | {task for task, _ in holdover.reports}
            occupied -= len(holdover.running) + len(holdover.detached)
        self.scheduler = Scheduler(
            SchedulerConfig(self.capacity, self.window), self.clock, self.aborted,
            occupied=occupied, holdover=holdover,
        )
        self.scheduler.validate()
        self.received: set[TaskSpec] = carried
        self.after_close: set[TaskSpec] = set()
        self.reported: set[TaskSpec] = set()
        self.closed = self.broken = False
        self.wake: float | None = None

    # ------------------------------------------------------------ feeding

    def feed(self, *events: Event) -> None:
        out = self.scheduler.handle(*events)
        self.scheduler.validate()
        ended = self.closed or self.broken
        for instruction in out:
            match instruction:
                case Run(tasks):
                    assert not ended
                    for task in tasks:
                        assert task in self.received and task not in self.reported
                        assert task not in self.in_flight, f"{task} runs twice"
                        self.in_flight[task] = self.policies[task]
                    assert len(self.in_flight) <= self.capacity, "over capacity"
                case SendResults(results):
                    assert not ended, "sent after the stream ended"
                    for task, _ in results:
                        assert task in self.received, "reported on another session"
                        assert task not in self.reported, f"{task} reported twice"
                        assert task not in self.sent_ever, f"{task} reported on two streams"
                        self.reported.add(task)
                        self.sent_ever.add(task)
                case CancelRunning(tasks):
                    assert all(task in self.in_flight for task in tasks)
                case Wake(at):
                    self.wake = at
                case SendCredit(window):
                    assert window == 0 and not ended
                case CloseStream():
                    assert not ended
                    self.closed = True
        if any(isinstance(e, StreamBroken) for e in events):
            self.broken = True
            assert all(isinstance(i, CancelRunning | Wake) for i in out)
        else:
            # No slot leaks, none forgotten: the session's count is the executor's.
            assert self.scheduler.slots_taken == len(self.in_flight)

    def outcome(self, task: TaskSpec) -> Outcome:
        roll = self.rng.random()
        if roll < 0.55:
            return b"ok"
        if roll < 0.65:
            return Failure(ErrorKind.OPERATION, "ValueError", "bad")
        policy = self.in_flight[task]
        return Transient("TransientError", "flaky", policy.delay(task.retries + 1))

    # -------------------------------------------------------------- steps

    def receive(self) -> None:
        if len(self.received) - len(self.reported) >= self.window + 2:
            return  # the orchestrator keeps (roughly) to the credit window
        tasks = []
        for _ in range(self.rng.randint(1, 4)):
            self.next_id += 1
            timeout = self.rng.choice([0.0, 0.0, 0.0, 0.25])
            task = TaskSpec(
                self.rng.choice(KEYS), self.next_id, "op", 0, b"", b"", (), 0, self.next_id,
                timeout,
            )
            self.policies[task] = self.rng.choice(POLICIES)
            tasks.append(task)
        self.received.update(tasks)
        if self.closed:
            self.after_close.update(tasks)
        self.feed(TasksReceived(tasks))

    def new_capacity(self) -> int | None:
        """Sometimes a capacity that changed with what the executor learned
        (never below the slots it has taken), as the process executor's does."""
        if self.rng.random() < 0.7:
            return None
        self.capacity = max(1, len(self.in_flight), self.rng.choice([1, 2, 3, 8, 16]))
        return self.capacity

    def finish_one(self) -> None:
        if self.in_flight:
            task = self.rng.choice(list(self.in_flight))
            outcome = self.outcome(task)
            del self.in_flight[task]
            seconds = self.rng.uniform(0.0, 0.3)
            self.feed(ExecutionFinished([(task, outcome, seconds)], self.new_capacity()))

    def hand_back(self) -> None:
        """Tasks the executor had no room for, or that a dead child held, come
        back unstarted."""
        if self.in_flight:
            back = self.rng.sample(list(self.in_flight), self.rng.randint(1, len(self.in_flight)))
            for task in back:
                del self.in_flight[task]
            self.feed(ExecutionFinished([], self.new_capacity(), back))

    def finish_all(self) -> None:
        results = [(t, self.outcome(t), self.rng.uniform(0.0, 0.1)) for t in self.in_flight]
        if results:
            self.in_flight.clear()
            self.feed(ExecutionFinished(results))

    def crash(self) -> None:
        if self.in_flight:
            crashed = self.rng.sample(list(self.in_flight), self.rng.randint(1, len(self.in_flight)))
            for task in crashed:
                del self.in_flight[task]
            shared = len(crashed) > 1 or self.rng.random() < 0.2
            self.feed(PoolCrashed([(t, 0.01) for t in crashed], shared, "BrokenProcessPool"))

    def tick(self) -> None:
        self.clock.now += self.rng.uniform(0.0, 0.3)
        if self.wake is not None and self.rng.random() < 0.7:
            self.clock.now = max(self.clock.now, self.wake)
        if (self.wake is not None and self.clock.now >= self.wake) or self.rng.random() < 0.2:
            self.wake = None
            self.feed(Tick())

    def step(self) -> None:
        rng = self.rng
        if (self.closed and rng.random() < 0.2) or self.broken:
            self._new_session()  # the runtime would reconnect (or stop)
        action = rng.choices(
            ["receive", "one", "all", "crash", "tick", "abort", "abort_all", "drain",
             "expire", "break", "back"],
            [30, 25, 6, 3, 20, 2, 0.3, 2, 1, 1, 3],
        )[0]
        match action:
            case "receive":
                self.receive()
            case "one":
                self.finish_one()
            case "all":
                self.finish_all()
            case "crash":
                self.crash()
            case "tick":
                self.tick()
            case "abort":
                self.feed(AbortReceived([rng.choice(KEYS)]))
            case "abort_all":
                self.feed(AbortAllReceived())
            case "drain":
                self.feed(DrainRequested(rng.uniform(0.0, 1.0)))
            case "expire":
                self.feed(DrainExpired())
            case "break":
                self.feed(StreamBroken())
            case "back":
                self.hand_back()

    def settle(self) -> None:
        """Drain the last session to its end; check every task was reported once."""
        if self.broken:
            return
        self.feed(DrainRequested(self.rng.uniform(0.0, 2.0)))
        for _ in range(10_000):
            if self.closed:
                break
            if self.in_flight:
                self.finish_one()
            else:
                self.tick()
        assert self.closed, "the drain never ended"
        assert self.reported == self.received - self.after_close


@pytest.mark.parametrize("chunk", range(4))
def test_random_interleavings_keep_every_invariant(chunk: int) -> None:
    per_chunk = SEEDS // 4
    for seed in range(chunk * per_chunk, (chunk + 1) * per_chunk):
        sim = Sim(seed)
        try:
            for _ in range(STEPS):
                sim.step()
            sim.settle()
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc
