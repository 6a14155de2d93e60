"""A worker's batch of results, matched to leases and grouped by routing key.

The hot path of the orchestrator: per task, a lease lookup and three
appends. Reports that are not a task's outcome (handed back, crashed,
timed out, aborted) are set apart for the router to re-queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from orchestrator_service._events import WorkerResult
from orchestrator_service._model import ErrorInfo, ErrorKind, TaskRecord

# Error kinds that report what happened to a dispatch, not the task's outcome.
REDELIVERY = frozenset(
    {ErrorKind.RETURNED, ErrorKind.CRASHED, ErrorKind.TIMEOUT, ErrorKind.ABORTED}
)


class Leaseholder(Protocol):
    leases: dict[int, TaskRecord]


class Counters(Protocol):
    duplicates: int
    retried: int


class Outcomes:
    class Group:
        """Outcomes of one routing key's tasks, as columns; ``errors`` stays
        None while every one of them succeeded."""

        __slots__ = ("errors", "outputs", "retries", "seconds", "tasks")

        def __init__(self) -> None:
            self.tasks: list[TaskRecord] = []
            self.outputs: list[bytes] = []
            self.seconds: list[float] = []
            self.errors: list[ErrorInfo | None] | None = None
            self.retries = 0

        def add(
            self, task: TaskRecord, output: bytes, error: ErrorInfo | None, seconds: float
        ) -> None:
            self.tasks.append(task)
            self.outputs.append(output)
            self.seconds.append(seconds)
            if self.errors is not None:
                self.errors.append(error)
            elif error is not None:
                self.errors = [None] * (len(self.tasks) - 1) + [error]

    __slots__ = ("done", "groups", "reports")

    def __init__(self) -> None:
        self.groups: dict[str, Outcomes.Group] = {}
        self.reports: list[tuple[TaskRecord, ErrorInfo]] = []
        self.done = 0  # leases the batch ended

    def add(
        self, task: TaskRecord, output: bytes, error: ErrorInfo | None, seconds: float
    ) -> None:
        group = self.groups.get(task.routing_key)
        if group is None:
            group = self.groups[task.routing_key] = Outcomes.Group()
        group.add(task, output, error, seconds)


def sort_results(
    worker: Leaseholder, results: Sequence[WorkerResult], stats: Counters
) -> Outcomes:
    """Match ``results`` to the worker's leases: a result whose lease is gone,
    or names another task, is a duplicate and changes nothing."""
    outcomes = Outcomes()
    leases = worker.leases
    pop = leases.pop
    groups = outcomes.groups
    reports = outcomes.reports
    key: str | None = None
    group = Outcomes.Group()
    # The current group's columns, bound once per run of one routing key:
    # per task only the appends are left (Group.add, inlined).
    tasks, outputs, times = group.tasks, group.outputs, group.seconds
    done = 0
    for lease_id, task_id, output, error, retries, seconds in results:
        task = pop(lease_id, None)
        if task is None or task.task_id != task_id:
            if task is not None:  # not this lease's task: keep the live lease
                leases[lease_id] = task
            stats.duplicates += 1
            continue
        done += 1
        if retries:
            stats.retried += retries
        if error is not None and error.kind in REDELIVERY:
            reports.append((task, error))
            continue
        if task.routing_key is not key:
            key = task.routing_key
            found = groups.get(key)
            if found is None:
                found = groups[key] = Outcomes.Group()
            group = found
            tasks, outputs, times = group.tasks, group.outputs, group.seconds
        group.retries += retries
        if error is None and group.errors is None:
            tasks.append(task)
            outputs.append(output)
            times.append(seconds)
        else:
            group.add(task, output, error, seconds)
    outcomes.done = done
    return outcomes
