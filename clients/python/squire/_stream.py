"""The declarative API: an indexed stream and the directive to run over it.

    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
    stream.run(client)                    # 143
    IndexedStream.from_iterable(["a", "bb"]).map("length").run(client)   # [1, 2]

The orchestrator evaluates the whole chain server-side; this module only
builds the plan, streams the inputs and collects what comes back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Collection,
    Generator,
    Iterable,
    Sequence,
    Sized,
)
from typing import TYPE_CHECKING, Any

from squire._directive import DirectiveRun
from squire._errors import SquireError
from squire._model import (
    DirectiveEvent,
    FoldStage,
    FoldValue,
    ItemBatch,
    MapStage,
    Plan,
    Progress,
    Stage,
)
from squire._wire import gather_items
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from squire._client import AsyncClient, Client
    from squire._directive import AsyncDirectiveRun
    from squire._progress import ProgressReporter
    from squire._session import SessionRun
    from squire.api.v1 import squire_pb2 as pb


class IndexedStream:
    """Inputs indexed by position (from 0) plus map stages and an optional final fold.

    Immutable: :meth:`map` and :meth:`fold` return new streams. Operation
    parameters are keyword arguments, sent encoded with the run's serializer.
    The source is iterated once per run, lazily; a generator source can
    therefore be run only once.

    Terminals, for a :class:`Client` / an :class:`AsyncClient`:

    - :meth:`run` / :meth:`run_async`: a map plan gives the list of results in
      input order; a fold plan gives the fold value.
    - :meth:`iter` / :meth:`aiter`: ``(index, value)`` pairs in completion order
      (map plans only).
    - :meth:`events` / :meth:`aevents`: the raw :data:`DirectiveEvent` stream.

    An element that failed with ``FatalStrategy.IGNORE`` shows up as
    :class:`Skipped` in map results and contributes ``empty()`` to a fold; any
    other fatal failure raises :class:`DirectiveFailed`.
    """

    __slots__ = ("_priority", "_source", "_stages", "_task_timeout", "_total")

    def __init__(
        self, source: Iterable[Any] | AsyncIterable[Any], *, total: int | None = None
    ) -> None:
        if not isinstance(source, Iterable | AsyncIterable):
            raise TypeError(f"an IndexedStream needs an iterable, got {type(source).__name__}")
        if total is None and isinstance(source, Sized):
            total = len(source)
        self._source = source
        self._total = total
        self._stages: tuple[Stage, ...] = ()
        self._task_timeout: float | None = None
        self._priority = 0

    @classmethod
    def from_iterable(
        cls, source: Iterable[Any] | AsyncIterable[Any], *, total: int | None = None
    ) -> IndexedStream:
        """A stream over ``source``; ``total`` is a progress hint (``len()`` if known)."""
        return cls(source, total=total)

    # ------------------------------------------------------------- building

    def map(self, operation: str, /, **params: Any) -> IndexedStream:
        """Apply ``operation(element, **params)`` to every element."""
        self._check_open_ended(f"map({operation!r})")
        _check_name(operation)
        return self._with_stage(MapStage(operation, dict(params)))

    def fold(self, monoid: str, /, **params: Any) -> IndexedStream:
        """Reduce the elements with ``monoid``; must be the last stage."""
        self._check_open_ended(f"fold({monoid!r})")
        _check_name(monoid)
        return self._with_stage(FoldStage(monoid, dict(params)))

    def with_task_timeout(self, seconds: float | None) -> IndexedStream:
        """Fail any single task that runs longer than ``seconds`` (None: no limit)."""
        if seconds is not None and seconds <= 0:
            raise ValueError(f"a task timeout must be positive, got {seconds}")
        clone = self._copy()
        clone._task_timeout = seconds
        return clone

    def with_priority(self, priority: int) -> IndexedStream:
        """Serve this directive before its tenant's lower-priority ones
        (strictly, within the tenant's share; other tenants are not
        affected). From -1000 to 1000; default 0."""
        if not isinstance(priority, int) or not -1000 <= priority <= 1000:
            raise ValueError(f"a priority is an integer from -1000 to 1000, got {priority!r}")
        clone = self._copy()
        clone._priority = priority
        return clone

    def plan(self, serializer: str | Serializer = "json") -> Plan:
        """The plan the orchestrator will evaluate."""
        return Plan(
            stages=self._stages,
            serializer=Serializer.parse(serializer),
            expected_items=self._total,
            task_timeout=self._task_timeout,
            priority=self._priority,
        )

    def describe(self) -> str:
        """E.g. ``map(fib_at) -> fold(sum)``."""
        return self.plan().describe()

    def __repr__(self) -> str:
        return f"<IndexedStream {self.describe()}>"

    # ------------------------------------------------------------ terminals

    def events(
        self, client: Client, *, serializer: str | Serializer = "json"
    ) -> DirectiveRun | SessionRun:
        """Start the directive and return its event stream (see :class:`DirectiveRun`)."""
        return client.run_directive(self.plan(serializer), self._sync_source())

    def aevents(
        self, client: AsyncClient, *, serializer: str | Serializer = "json"
    ) -> AsyncDirectiveRun:
        """Start the directive on an :class:`AsyncClient`; ``async for`` its events."""
        return client.run_directive(self.plan(serializer), self._source)

    def run(
        self, client: Client, *, progress: bool = False, serializer: str | Serializer = "json"
    ) -> Any:
        """Run to the end: map results in input order, or the fold value.

        ``progress=True`` shows a live progress bar on stderr.
        """
        plan = self.plan(serializer)
        collector = _Collector(plan)
        with (
            client._run_directive(plan, self._sync_source(), collector.gather) as run,
            _reporter(progress, plan, collector) as reporter,
        ):
            for event in run:
                collector.add(event)
                reporter.update(event)
        return collector.result(run.inputs_sent)

    def submit(self, client: Client, *, serializer: str | Serializer = "json") -> str:
        """Start the directive *detached* and return its id once the
        orchestrator has journaled the plan and every input; it runs on
        without this caller. Read it later, from any process, with
        :meth:`Client.attach` (or ``squire results ID``). Needs an
        orchestrator with a journal (the default store)."""
        plan = dataclasses.replace(self.plan(serializer), detached=True, expected_items=None)
        run = DirectiveRun(client._directives, plan, self._sync_source(),
                           reattach_timeout=client.reattach_timeout)
        try:
            for event in run:
                # Progress counts journaled inputs only; total is set once the
                # end of the input is journaled too.
                if (isinstance(event, Progress) and run._feeder.exhausted
                        and run.inputs_sent and event.total == event.received == run.inputs_sent):
                    break
        finally:
            run.cancel()  # a detached directive lives on
        assert run.directive_id is not None
        return run.directive_id

    async def run_async(
        self,
        client: AsyncClient,
        *,
        progress: bool = False,
        serializer: str | Serializer = "json",
    ) -> Any:
        """:meth:`run` for an :class:`AsyncClient`."""
        plan = self.plan(serializer)
        collector = _Collector(plan)
        with _reporter(progress, plan, collector) as reporter:
            async with client._run_directive(plan, self._source, collector.gather) as run:
                async for event in run:
                    collector.add(event)
                    reporter.update(event)
        return collector.result(run.inputs_sent)

    def iter(
        self, client: Client, *, serializer: str | Serializer = "json"
    ) -> Generator[tuple[int, Any], None, None]:
        """``(index, value)`` pairs as they complete. Map plans only.

        The directive starts with the first ``next()``; closing the generator
        early (``close()``, or dropping it after a ``break``) cancels it.
        """
        plan = self.plan(serializer)
        _require_map(plan, "iter")
        return _iter_items(client, plan, self._sync_source())

    def aiter(
        self, client: AsyncClient, *, serializer: str | Serializer = "json"
    ) -> AsyncGenerator[tuple[int, Any], None]:
        """:meth:`iter` for an :class:`AsyncClient`."""
        plan = self.plan(serializer)
        _require_map(plan, "aiter")
        return _aiter_items(client, plan, self._source)

    # -------------------------------------------------------------- private

    def _copy(self) -> IndexedStream:
        clone = IndexedStream.__new__(IndexedStream)
        clone._source = self._source
        clone._total = self._total
        clone._stages = self._stages
        clone._task_timeout = self._task_timeout
        clone._priority = self._priority
        return clone

    def _with_stage(self, stage: Stage) -> IndexedStream:
        clone = self._copy()
        clone._stages = (*self._stages, stage)
        return clone

    def _check_open_ended(self, what: str) -> None:
        if self._stages and isinstance(self._stages[-1], FoldStage):
            last = self._stages[-1].describe()
            raise ValueError(f"cannot add {what} after {last}: fold must be the last stage")

    def _sync_source(self) -> Iterable[Any]:
        if not isinstance(self._source, Iterable):
            raise TypeError("this stream's source is an async iterable: run it with an AsyncClient")
        return self._source


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"an operation name must be a non-empty string, got {name!r}")


def _require_map(plan: Plan, terminal: str) -> None:
    if plan.fold is not None:
        raise ValueError(f"{terminal}() yields map results; a plan ending in a fold has one value")


def _reporter(enabled: bool, plan: Plan, collector: _Collector) -> ProgressReporter:
    from squire._progress import NullProgress, ProgressBar

    return ProgressBar(plan, items_seen=collector.received) if enabled else NullProgress()


# A list slot whose result has not arrived.
_MISSING: Any = object()
# How far past the results received an index may be and still grow the list:
# it covers the results in flight, and keeps the list proportional to what
# arrived whatever the indices (a farther index waits in a dict).
_GROW_SLACK = 4096


class _Collector:
    """Gathers map results by index (or the fold value) and checks completeness.

    Item events never become ItemBatch events here: :meth:`gather` gets them
    from the run and their values go straight into a list at their index.
    A later result for an index replaces an earlier one.
    """

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._values: list[Any] = []
        self._far: dict[int, Any] = {}  # indices that were too far past the list's end
        self._received = 0
        self._fold: FoldValue | None = None

    def gather(self, items: Sequence[pb.IndexedResult]) -> int:
        """Decode an item event into the results (called on the run's reading
        thread); how many were skipped."""
        skipped = gather_items(items, self._plan.serializer, self._values, self._place)
        self._received += len(items)
        return skipped

    def _place(self, index: int, value: Any) -> None:
        values = self._values
        if index < 2 * self._received + _GROW_SLACK:
            # At least doubled: the list grows a few times, not once per result.
            values.extend([_MISSING] * (max(index + 1, 2 * len(values)) - len(values)))
            values[index] = value
        else:
            self._far[index] = value

    def received(self) -> int:
        """Map results received so far."""
        return self._received

    def add(self, event: DirectiveEvent) -> None:
        if isinstance(event, FoldValue):
            self._fold = event

    def result(self, inputs_sent: int) -> Any:
        if self._plan.fold is not None:
            if self._fold is None:
                raise SquireError("the directive ended without a fold value")
            return self._fold.value
        values = self._values
        if len(values) < inputs_sent:
            values.extend([_MISSING] * (inputs_sent - len(values)))
        complete = True
        for index, value in self._far.items():
            if index >= inputs_sent:
                complete = False
            elif values[index] is _MISSING:  # else a later result for the index is there
                values[index] = value
        # Complete: no slot below inputs_sent missing, none above it filled.
        spare = len(values) - inputs_sent
        if (
            complete
            and values.count(_MISSING) == spare
            and values[inputs_sent:].count(_MISSING) == spare
        ):
            del values[inputs_sent:]
            return values
        seen = {index for index, value in enumerate(values) if value is not _MISSING}
        seen.update(self._far)
        raise _incomplete(seen, inputs_sent)


def _check_complete(indices: Collection[int], inputs_sent: int) -> None:
    # Indices are distinct: n of them within [0, n) are exactly range(n).
    if len(indices) == inputs_sent and (
        not inputs_sent or (min(indices) >= 0 and max(indices) < inputs_sent)
    ):
        return
    raise _incomplete(set(indices), inputs_sent)


def _incomplete(seen: set[int], inputs_sent: int) -> SquireError:
    missing = sorted(set(range(inputs_sent)) - seen)
    return SquireError(
        f"the directive ended with {len(seen)} results for {inputs_sent} inputs"
        + (f"; missing indices {missing[:10]}" if missing else "")
    )


def _iter_items(
    client: Client, plan: Plan, source: Iterable[Any]
) -> Generator[tuple[int, Any], None, None]:
    seen: set[int] = set()
    with client.run_directive(plan, source) as run:
        for event in run:
            if isinstance(event, ItemBatch):
                for index, value in event.items:
                    seen.add(index)
                    yield index, value
    _check_complete(seen, run.inputs_sent)


async def _aiter_items(
    client: AsyncClient, plan: Plan, source: Iterable[Any] | AsyncIterable[Any]
) -> AsyncGenerator[tuple[int, Any], None]:
    seen: set[int] = set()
    async with client.run_directive(plan, source) as run:
        async for event in run:
            if isinstance(event, ItemBatch):
                for index, value in event.items:
                    seen.add(index)
                    yield index, value
    _check_complete(seen, run.inputs_sent)
