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


@dataclass(slots=True)  # not frozen: built once per element on the hot path
class ItemOutcome:
    """One element's result as the client sees it."""

    index: int
    value: bytes
    skipped: bool = False
    error: str = ""


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
        self.items: list[ItemOutcome] = []  # emitted, not yet taken by the servicer
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

    def take_items(self) -> list[ItemOutcome]:
        """Emitted items in order, at most ``MAX_TAKE_BYTES`` of them per take."""
        items = self.items
        size = 0
        for n, item in enumerate(items):
            size += len(item.value) + len(item.error)
            if size > MAX_TAKE_BYTES and n:
                self.items = items[n:]
                return items[:n]
        self.items = []
        return items

    # ---------------------------------------------------------------- input

    def add_inputs(self, items: list[bytes]) -> None:
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
        # The hot path: one map task per element, queued in one call.
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
                0, 0, 0, 0, 0.0, 0, first + i, 0,
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
        elif task.stage == FOLD_STAGE:
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
        elif value is None:
            self.items.append(ItemOutcome(index, b"", skipped=True, error=error))
        else:
            self.items.append(ItemOutcome(index, value))

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
