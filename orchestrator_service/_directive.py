"""Server-side evaluation of one directive: map stages, then an optional fold.

Pure state, like ``_fold``: the router hands a directive its inputs and
results, and the directive returns the tasks it wants queued; it never
reaches back into the router. What it emitted waits in ``items`` until the
router drains it into an ``EmitItems`` instruction.

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

from collections.abc import Sequence

from orchestrator_service._fold import FoldState
from orchestrator_service._items import Items
from orchestrator_service._journal_records import (
    ADVANCE,
    CANCEL,
    END_INPUT,
    FAIL,
    INPUTS,
    RESULTS,
    Record,
)
from orchestrator_service._model import (
    APPLY,
    COMBINE,
    IGNORE,
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    PlanSpec,
    ProgressSnapshot,
    TaskRecord,
)

FOLD_STAGE = -1  # TaskRecord.stage of a fold combine over [index, end)
EMPTY_STAGE = -2  # TaskRecord.stage of the empty() task of an empty fold


class Directive:
    def __init__(
        self,
        directive_id: str,
        plan: PlanSpec,
        *,
        max_fold_operands: int,
        now: float,
        journal: bool = False,
    ) -> None:
        self.id = directive_id
        self.plan = plan
        self.started_at = now
        self.state = DirectiveState.RUNNING
        self.failure: tuple[Code, str] | None = None
        self.received = 0
        self.input_closed = False
        self.completed = 0  # elements through every map stage, or skipped
        self.skipped = 0
        self.retries = 0
        self.tasks_done = 0
        self.items = Items()  # emitted since the router last drained it
        self.fold_value: bytes | None = None
        self.credited = 0  # completed elements already given back as input credit
        self.emitted = 0  # items (values and skipped) handed to the router so far
        # The journal: every call that changes this directive, in order, since
        # the router last drained it (None: not journaled). Replaying them
        # into a new Directive rebuilds this one exactly (see ``_restore``):
        # the same task ids, fold ranges and items in the same order.
        self.log: list[Record] | None = [] if journal else None
        self._next_task_id = 0
        self._maps = plan.maps
        self._fold_stage = plan.fold
        self._fold = FoldState(max_fold_operands) if plan.fold is not None else None
        self._empty_requested = False

    @property
    def finished(self) -> bool:
        return self.state is not DirectiveState.RUNNING

    def progress(self, queued: int, leased: int, waiting: str = "") -> ProgressSnapshot:
        return ProgressSnapshot(
            received=self.received,
            completed=self.completed,
            skipped=self.skipped,
            total=self.received if self.input_closed else self.plan.expected_items,
            queued=queued,
            leased=leased,
            retries=self.retries,
            tasks_done=self.tasks_done,
            waiting=waiting,
        )

    def end_status(self) -> tuple[Code, str] | None:
        """How a finished directive's call ends: None for OK, else (code, message)."""
        if self.state is DirectiveState.DONE:
            return None
        if self.failure is not None:
            return self.failure
        return Code.CANCELLED, "the directive was cancelled"

    # ---------------------------------------------------------------- input

    def add_inputs(self, items: Sequence[bytes], now: float) -> list[TaskRecord]:
        """The next input elements; returns their first-stage tasks."""
        if self.state is not DirectiveState.RUNNING:
            return []
        if self.log is not None:
            self.log.append((INPUTS, items))
        first = self.received
        self.received += len(items)
        if not self._maps:
            for index, item in enumerate(items, first):
                self._element_done(index, item)
            return []
        # The hot path: one map task per element, built positionally.
        stage = self._maps[0]
        key = self.id
        ids = self._next_task_id + 1
        self._next_task_id += len(items)
        op = stage.operation
        params = stage.params
        serializer = self.plan.serializer
        timeout = self.plan.task_timeout_seconds
        return [
            TaskRecord(
                key, ids + i, op, APPLY, params, item, (), serializer, b"", timeout,
                0, 0, 0, 0, now, 0, first + i, 0,
            )
            for i, item in enumerate(items)
        ]

    def end_input(self) -> None:
        if self.log is not None and not self.input_closed:
            self.log.append((END_INPUT,))
        self.input_closed = True

    # -------------------------------------------------------------- results

    def on_results(
        self,
        tasks: Sequence[TaskRecord],
        outputs: Sequence[bytes],
        errors: Sequence[ErrorInfo | None] | None,
        now: float,
    ) -> list[TaskRecord]:
        """Outcomes of this directive's tasks (``errors`` None: all succeeded);
        returns the tasks of the next stages they lead to."""
        if self.state is not DirectiveState.RUNNING:
            return []
        if self.log is not None:
            self.log.append((RESULTS, [task.task_id for task in tasks], outputs, errors))
        self.tasks_done += len(tasks)
        last = len(self._maps) - 1
        if errors is None and self._fold is None:
            # The hot path (a profile showed it): every task ran the last map
            # stage, so every output is an item; they go in with two extends.
            indexes = [task.index for task in tasks if task.stage == last]
            if len(indexes) == len(tasks):
                items = self.items
                items.indexes.extend(indexes)
                items.values.extend(outputs)
                items.nbytes += sum(map(len, outputs))
                self.completed += len(tasks)
                return []
        follow: list[TaskRecord] = []
        for position, (task, output) in enumerate(zip(tasks, outputs, strict=True)):
            error = errors[position] if errors is not None else None
            if error is not None:
                self._on_error(task, error)
                if self.finished:
                    return []
            elif task.stage == FOLD_STAGE:
                assert self._fold is not None
                self._fold.combined(task.index, task.end, output)
            elif task.stage == EMPTY_STAGE:
                self._finish(output)
            elif task.stage < last:
                follow.append(self._task(APPLY, task.stage + 1, task.index, output, now))
            else:
                self._element_done(task.index, output)
        return follow

    def advance(self, now: float) -> list[TaskRecord]:
        """After a batch of inputs or results: the fold combines now possible,
        and the end once every element is through."""
        if self.state is not DirectiveState.RUNNING:
            return []
        if self.log is not None:
            self.log.append((ADVANCE,))
        fold = self._fold
        tasks: list[TaskRecord] = []
        if fold is not None:
            tasks = [
                self._task(COMBINE, FOLD_STAGE, r.start, b"", now, r.operands, r.end)
                for r in fold.schedule()
            ]
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
                    tasks.append(self._task(COMBINE, EMPTY_STAGE, 0, b"", now))
        return tasks

    def fail(self, code: Code, message: str) -> None:
        if self.state is DirectiveState.RUNNING:
            if self.log is not None:
                self.log.append((FAIL, code.value, message))
            self.state = DirectiveState.FAILED
            self.failure = (code, message)

    def cancel(self) -> None:
        if self.state is DirectiveState.RUNNING:
            if self.log is not None:
                self.log.append((CANCEL,))
            self.state = DirectiveState.CANCELLED

    def take_credit(self) -> int:
        """Input credit earned since the last take: one per completed element."""
        credit = self.completed - self.credited
        self.credited = self.completed
        return credit

    # -------------------------------------------------------------- private

    def _task(
        self,
        kind: int,
        stage: int,
        index: int,
        value: bytes,
        now: float,
        operands: Sequence[bytes] = (),
        end: int = 0,
    ) -> TaskRecord:
        if stage >= 0:
            operation, params = self._maps[stage].operation, self._maps[stage].params
        else:
            assert self._fold_stage is not None
            operation, params = self._fold_stage.monoid, self._fold_stage.params
        self._next_task_id += 1
        return TaskRecord(
            self.id, self._next_task_id, operation, kind, params, value, operands,
            self.plan.serializer, b"", self.plan.task_timeout_seconds,
            0, 0, 0, 0, now, stage, index, end,
        )

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
            self.fail(Code.INVALID_ARGUMENT, f"{error.message} {context}")
        elif error.kind is ErrorKind.UNKNOWN_OPERATION:
            self.fail(Code.FAILED_PRECONDITION, f"{error.message} {context}")
        else:
            exhausted = " (retries exhausted)" if error.retries_exhausted else ""
            self.fail(
                Code.ABORTED, f"Fatal operation error: {error.message}{exhausted} {context}"
            )

    def _finish(self, value: bytes | None) -> None:
        self.fold_value = value
        self.state = DirectiveState.DONE
