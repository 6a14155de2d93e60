"""Server-side evaluation of one directive: map stages, then an optional fold.

Chains stream: element ``i`` enters stage ``s+1`` as soon as stage ``s``
produced it; there is no barrier between stages. The fold (see ``_fold``)
starts on the first finished elements while the maps still run.

Map results are emitted in completion order tagged with their index. An
element whose task fails with ``FatalStrategy.IGNORE`` is *skipped*: map
reports the index as skipped (with the error), fold lets it contribute
``empty()``. A fold combine task cannot be ignored: losing a range would
silently change the value, so any combine failure fails the directive.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator_service._fold import FoldState
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    IGNORE,
    Code,
    ErrorInfo,
    ErrorKind,
    PlanSpec,
    TaskRecord,
)

if TYPE_CHECKING:
    from orchestrator_service._core import Channel, Router

# Results leave in takes of at most this many payload bytes (one larger
# result goes alone), so no message built from one take nears the 64 MiB
# gRPC limit however big the outputs are.
MAX_TAKE_BYTES = 4 * 1024 * 1024

FOLD_STAGE = -1  # TaskRecord.stage of a fold combine over [index, end)
EMPTY_STAGE = -2  # TaskRecord.stage of the empty() task of an empty fold


class DirectiveState(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class ItemOutcome:
    """One element's result as the client sees it (see :meth:`Items.outcomes`)."""

    index: int
    value: bytes
    skipped: bool = False
    error: str = ""


class Items:
    """Emitted results not yet sent, as columns: the values of finished
    elements by index, and the skipped elements with their errors.

    Columns, not one object per element: a batch of results is appended with
    two ``extend`` calls (see bench/README.md). The order between values and
    skipped elements is not kept; results are emitted in completion order
    tagged with their index anyway."""

    __slots__ = ("indexes", "nbytes", "skipped", "values")

    def __init__(self) -> None:
        self.indexes: list[int] = []
        self.values: list[bytes] = []
        self.skipped: list[tuple[int, str]] = []  # (index, error)
        self.nbytes = 0  # payload bytes held: values and errors

    def __len__(self) -> int:
        return len(self.indexes) + len(self.skipped)

    def outcomes(self) -> list[ItemOutcome]:
        """One object per element, for tests and tools (not the hot path)."""
        out = [ItemOutcome(i, v) for i, v in zip(self.indexes, self.values, strict=True)]
        out.extend(ItemOutcome(i, b"", skipped=True, error=e) for i, e in self.skipped)
        return out

    def take(self, max_bytes: int) -> Items:
        """Everything held, or as much as fits ``max_bytes`` (at least one element)."""
        taken = Items()
        if self.nbytes <= max_bytes:  # the usual case: no per-element work
            taken.indexes, self.indexes = self.indexes, []
            taken.values, self.values = self.values, []
            taken.skipped, self.skipped = self.skipped, []
            taken.nbytes, self.nbytes = self.nbytes, 0
            return taken
        size = values = skipped = 0
        for value in self.values:
            if size + len(value) > max_bytes and values:
                break
            size += len(value)
            values += 1
        if values == len(self.values):
            for _, error in self.skipped:
                if size + len(error) > max_bytes and (values or skipped):
                    break
                size += len(error)
                skipped += 1
        taken.indexes, self.indexes = self.indexes[:values], self.indexes[values:]
        taken.values, self.values = self.values[:values], self.values[values:]
        taken.skipped, self.skipped = self.skipped[:skipped], self.skipped[skipped:]
        taken.nbytes = size
        self.nbytes -= size
        return taken


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    received: int
    completed: int
    skipped: int
    total: int
    queued: int
    running: int
    retries: int
    tasks_done: int


class Directive:
    """A directive's evaluation state; driven by the Router, read by the servicer."""

    def __init__(
        self, router: Router, channel: Channel, plan: PlanSpec, started_at: float
    ) -> None:
        self.id = channel.id
        self.plan = plan
        self.started_at = started_at
        self.state = DirectiveState.RUNNING
        self.failure: tuple[Code, str] | None = None
        self.received = 0
        self.input_closed = False
        self.completed = 0  # elements through every map stage, or skipped
        self.skipped = 0
        self.retries = 0
        self.tasks_done = 0
        self.items = Items()  # emitted, not yet taken by the servicer
        self.fold_value: bytes | None = None
        self.notify: Callable[[], None] | None = None
        self._router = router
        self._channel = channel
        self._maps = plan.maps
        fold = plan.fold
        self._fold_stage = fold
        self._fold = FoldState(router.config.max_fold_operands) if fold is not None else None
        self._empty_requested = False
        self._woken_at = 0  # `completed` when the servicer was last woken

    # ---------------------------------------------------------------- state

    @property
    def finished(self) -> bool:
        return self.state is not DirectiveState.RUNNING

    def wants_input(self) -> bool:
        """Backpressure: keep at most ``directive_window`` elements in flight
        and as many unsent results, so neither a flood of input nor a client
        that stops reading grows the orchestrator's memory."""
        window = self._router.config.directive_window
        return (
            self.state is DirectiveState.RUNNING
            and not self.input_closed
            and self.received - self.completed < window
            and len(self.items) < window
        )

    def progress(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            received=self.received,
            completed=self.completed,
            skipped=self.skipped,
            total=self.received if self.input_closed else self.plan.expected_items,
            queued=self._channel.queued,
            running=self._channel.in_flight,
            retries=self.retries,
            tasks_done=self.tasks_done,
        )

    def end_status(self) -> tuple[Code, str] | None:
        """How a finished directive's call ends: None for OK, else (code, message)."""
        if self.state is DirectiveState.DONE:
            return None
        if self.failure is not None:
            return self.failure
        return Code.CANCELLED, "the directive was cancelled"

    def take_items(self) -> Items:
        """Emitted items, at most ``MAX_TAKE_BYTES`` of them per take."""
        return self.items.take(MAX_TAKE_BYTES)

    # ---------------------------------------------------------------- input

    def add_inputs(self, items: list[bytes], now: float) -> None:
        if self.state is not DirectiveState.RUNNING:
            return
        if self.input_closed:
            raise ValueError("input already ended")
        first = self.received
        self.received += len(items)
        if not self._maps:
            for index, item in enumerate(items, first):
                self._element_done(index, item)
            return
        # The hot path: one map task per element, built positionally and
        # queued in one call.
        stage = self._maps[0]
        channel = self._channel
        key = channel.id
        ids = channel.next_task_id + 1
        channel.next_task_id += len(items)
        op = stage.operation
        params = stage.params
        serializer = self.plan.serializer
        timeout = self.plan.task_timeout_seconds
        tasks = [
            TaskRecord(
                key, ids + i, op, APPLY, params, item, (), serializer, b"", timeout,
                0, 0, 0, 0, now, 0, first + i, 0,
            )
            for i, item in enumerate(items)
        ]
        self._router.enqueue_many(channel, (APPLY, op), tasks)

    def end_input(self) -> None:
        self.input_closed = True

    # -------------------------------------------------------------- results

    def on_result(self, task: TaskRecord, output: bytes, error: ErrorInfo | None) -> None:
        if self.state is not DirectiveState.RUNNING:
            return
        self.tasks_done += 1
        if error is not None:
            self._on_error(task, error)
        else:
            self._on_output(task, output)

    def on_outputs(self, tasks: list[TaskRecord], outputs: list[bytes]) -> None:
        """``on_result`` for a batch of tasks that succeeded, in one go."""
        if self.state is not DirectiveState.RUNNING:
            return
        self.tasks_done += len(tasks)
        if self._fold is None:
            # The hot path: every task ran the last map stage, so every
            # output is an item; they go in with two extends.
            last = len(self._maps) - 1
            indexes = [task.index for task in tasks if task.stage == last]
            if len(indexes) == len(tasks):
                items = self.items
                items.indexes.extend(indexes)
                items.values.extend(outputs)
                items.nbytes += sum(map(len, outputs))
                self.completed += len(tasks)
                return
        for task, output in zip(tasks, outputs, strict=True):
            self._on_output(task, output)

    def _on_output(self, task: TaskRecord, output: bytes) -> None:
        if task.stage == FOLD_STAGE:
            assert self._fold is not None
            self._fold.combined(task.index, task.end, output)
        elif task.stage == EMPTY_STAGE:
            self._finish(output)
        elif task.stage + 1 < len(self._maps):
            self._submit_map(task.stage + 1, task.index, output)
        else:
            self._element_done(task.index, output)

    def advance(self) -> None:
        """After a batch of inputs or results: dispatch fold combines, detect the end."""
        if self.state is not DirectiveState.RUNNING:
            return
        fold = self._fold
        if fold is not None:
            for request in fold.schedule():
                self._submit(
                    COMBINE, self._fold_operation, FOLD_STAGE, request.start, b"",
                    operands=request.operands, end=request.end,
                )
        if self.input_closed and self.completed == self.received:
            if fold is None:
                self._finish(None)
            else:
                complete, value = fold.result(self.received)
                if complete and value is not None:
                    self._finish(value)
                elif complete and not self._empty_requested:
                    # Empty input, or every element skipped: ask a worker for empty().
                    self._empty_requested = True
                    self._submit(COMBINE, self._fold_operation, EMPTY_STAGE, 0, b"")
        # Wake the servicer only for what it acts on: items to send, the end,
        # or room in the input window. New inputs alone change none of them,
        # and a needless wake-up sits on the latency path of a small directive.
        if self.items or self.finished or self.completed != self._woken_at:
            self._woken_at = self.completed
            self._wake()

    def fail(self, code: Code, message: str) -> None:
        if self.state is DirectiveState.RUNNING:
            self.state = DirectiveState.FAILED
            self.failure = (code, message)
            self._wake()

    def cancel(self) -> None:
        if self.state is DirectiveState.RUNNING:
            self.state = DirectiveState.CANCELLED
            self._wake()

    # -------------------------------------------------------------- private

    @property
    def _fold_operation(self) -> str:
        assert self._fold_stage is not None
        return self._fold_stage.operation

    def _submit_map(self, stage: int, index: int, value: bytes) -> None:
        self._submit(APPLY, self._maps[stage].operation, stage, index, value)

    def _submit(
        self,
        kind: int,
        operation: str,
        stage: int,
        index: int,
        value: bytes,
        *,
        operands: list[bytes] | None = None,
        end: int = 0,
    ) -> None:
        if stage >= 0:
            params = self._maps[stage].params
        else:
            assert self._fold_stage is not None
            params = self._fold_stage.params
        channel = self._channel
        channel.next_task_id += 1
        task = TaskRecord(
            channel.id, channel.next_task_id, operation, kind, params, value,
            operands if operands is not None else (), self.plan.serializer, b"",
            self.plan.task_timeout_seconds, 0, 0, 0, 0, 0.0, stage, index, end,
        )
        self._router.enqueue(channel, task)

    def _element_done(self, index: int, value: bytes | None, error: str = "") -> None:
        self.completed += 1
        if value is None:
            self.skipped += 1
        if self._fold is not None:
            self._fold.add_leaf(index, value)
            return
        items = self.items
        if value is None:
            items.skipped.append((index, error))
            items.nbytes += len(error)
        else:
            items.indexes.append(index)
            items.values.append(value)
            items.nbytes += len(value)

    def _on_error(self, task: TaskRecord, error: ErrorInfo) -> None:
        if error.strategy == IGNORE and task.stage >= 0:
            self._element_done(task.index, None, f"{error.error_type}: {error.message}")
            return
        where = (
            f"element {task.index}"
            if task.stage >= 0
            else f"fold range [{task.index}, {task.end})"
        )
        context = f"[{error.error_type} in {task.operation!r} at {where}]"
        if error.kind is ErrorKind.BAD_PAYLOAD:
            self._router.fail_directive(
                self, Code.INVALID_ARGUMENT, f"{error.message} {context}"
            )
        elif error.kind is ErrorKind.UNKNOWN_OPERATION:
            self._router.fail_directive(
                self, Code.FAILED_PRECONDITION, f"{error.message} {context}"
            )
        else:
            exhausted = " (retries exhausted)" if error.retries_exhausted else ""
            self._router.fail_directive(
                self, Code.ABORTED, f"Fatal operation error: {error.message}{exhausted} {context}"
            )

    def _finish(self, value: bytes | None) -> None:
        self.fold_value = value
        self.state = DirectiveState.DONE
        self._router.directive_finished(self)

    def _wake(self) -> None:
        if self.notify is not None:
            self.notify()
