"""A live progress bar for one directive, driven by its Progress events.

Rendered with rich on stderr. On a terminal it refreshes in place; anywhere
else (a pipe, a CI log) rich skips the live refresh and prints the final state
once when the directive ends, so it never garbles output or fails.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress
from rich.text import Text

from squire._model import DirectiveEvent, DirectiveStarted, FoldValue, ItemBatch, Plan, Progress

if TYPE_CHECKING:
    from typing import Self


class ProgressReporter(Protocol):
    """Receives every event of one directive run; a context manager around it."""

    def update(self, event: DirectiveEvent) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class NullProgress:
    """Reports nothing."""

    def update(self, event: DirectiveEvent) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass


class _RateColumn(ProgressColumn):
    """Elements completed per second (rich's speed columns assume bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:  # too few samples yet for rich's estimate
            speed = task.completed / task.elapsed
        return Text("" if speed is None else f"{speed:,.1f}/s", style="progress.data.speed")


class ProgressBar:
    """Plan, bar, ``done/total``, rate, elapsed; then skipped, retries, queued,
    running and the directive id's first characters.

    The total is the orchestrator's once the input is closed, the plan's
    ``expected_items`` hint before that, or unknown (a pulsing bar).
    ``items_seen`` counts the map results received when the run does not
    yield them as ItemBatch events (IndexedStream.run gathers them itself).
    """

    def __init__(
        self,
        plan: Plan,
        *,
        console: Console | None = None,
        items_seen: Callable[[], int] | None = None,
    ) -> None:
        self._plan = plan
        self._reported = 0  # completed, per the latest Progress event
        self._items_counted = 0  # map results received in ItemBatch events
        self._items_seen = items_seen
        self._total = plan.expected_items
        self._directive = ""
        self._waiting = ""  # what the directive waits for, as last printed
        self._progress = RichProgress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console if console is not None else Console(stderr=True),
            refresh_per_second=8,
        )
        self._task = self._progress.add_task(plan.describe(), total=plan.expected_items, detail="")

    def update(self, event: DirectiveEvent) -> None:
        if isinstance(event, DirectiveStarted):
            self._directive = event.directive_id
            self._progress.update(self._task, detail=self._detail(None))
        elif isinstance(event, Progress):
            self._reported = event.completed
            self._total = event.total or self._total
            if event.waiting and event.waiting != self._waiting:
                # Also a whole line above the bar, once: the bar's end is cut
                # off on a narrow terminal, and away from a terminal the bar is
                # printed only when the directive ends.
                self._progress.console.print(
                    f"{self._plan.describe()}: {event.waiting}", style="red",
                    markup=False, highlight=False,
                )
            self._waiting = event.waiting
            self._progress.update(
                self._task, completed=self._done, total=self._total, detail=self._detail(event)
            )
        elif isinstance(event, ItemBatch):
            # Progress events carry the authoritative count; items keep the
            # bar moving should an orchestrator send few of them.
            self._items_counted += len(event.items)
            self._progress.update(self._task, completed=self._done)
        elif isinstance(event, FoldValue):
            self._total = self._total or self._done
            self._progress.update(self._task, completed=self._total, total=self._total)

    def _detail(self, progress: Progress | None) -> str:
        # Most telling first: a narrow terminal cuts the end off.
        parts = []
        if progress is not None:
            if progress.waiting:
                parts.append(f"[red]{escape(progress.waiting)}[/]")
            if progress.skipped:
                parts.append(f"[yellow]skipped {progress.skipped}[/]")
            if progress.retries:
                parts.append(f"[yellow]retries {progress.retries}[/]")
            if progress.queued or progress.leased:
                parts.append(f"queued {progress.queued} · at workers {progress.leased}")
        if self._directive:
            parts.append(f"[dim]{self._directive[:8]}[/]")
        return " · ".join(parts)

    @property
    def _done(self) -> int:
        seen = self._items_counted
        if self._items_seen is not None:
            seen += self._items_seen()
        return max(self._reported, seen)

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()
