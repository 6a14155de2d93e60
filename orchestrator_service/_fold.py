"""Fold as a parallel tree reduction over contiguous index ranges.

A fold never assumes commutativity: it only combines *adjacent* segments,
left before right (``[0..3] + [4..5] -> [0..5]``). Each finished element
becomes a leaf segment ``[i, i+1)``; whenever two or more ready segments
touch, their run is sent as one combine task (at most ``max_operands``
operands, combined left to right by the worker — Dask's ``split_every``).
The fold therefore starts while the upstream map is still producing.

An element skipped by ``FatalStrategy.IGNORE`` is an *identity* segment
(value ``None``): it contributes ``empty()``, which by the monoid laws is the
same as leaving it out, so identities are merged away without any task.

Pure state: no I/O, no clock. The directive turns :class:`CombineRequest` s
into tasks and feeds their outputs back with :meth:`FoldState.combined`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Segment:
    start: int
    end: int
    value: bytes | None  # None: identity (every element in it was skipped)
    busy: bool = False  # a combine task for this range is in flight


@dataclass(frozen=True, slots=True)
class CombineRequest:
    start: int
    end: int
    operands: list[bytes]


class FoldState:
    def __init__(self, max_operands: int = 64) -> None:
        if max_operands < 2:
            raise ValueError("max_operands must be at least 2")
        self._max_operands = max_operands
        self._by_start: dict[int, Segment] = {}
        self._by_end: dict[int, Segment] = {}
        self._touched: list[Segment] = []
        self.leaves = 0
        self.combines_in_flight = 0

    # ---------------------------------------------------------------- input

    def add_leaf(self, index: int, value: bytes | None) -> None:
        """Element ``index`` finished with ``value`` (None when skipped)."""
        if index in self._by_start:
            raise ValueError(f"fold leaf {index} added twice")
        self.leaves += 1
        self._insert(Segment(index, index + 1, value))

    def combined(self, start: int, end: int, value: bytes) -> None:
        """The combine task for ``[start, end)`` returned ``value``."""
        seg = self._by_start.get(start)
        if seg is None or seg.end != end or not seg.busy:
            raise ValueError(f"no combine in flight for [{start}, {end})")
        seg.value = value
        seg.busy = False
        self.combines_in_flight -= 1
        self._touched.append(seg)

    # -------------------------------------------------------------- output

    def schedule(self) -> list[CombineRequest]:
        """Merge every run of adjacent ready segments; return the combine tasks needed."""
        requests: list[CombineRequest] = []
        while self._touched:
            seg = self._touched.pop()
            if seg.busy or self._by_start.get(seg.start) is not seg:
                continue  # already merged into a larger segment
            run = self._ready_run(seg)
            if len(run) < 2:
                continue
            for lo in range(0, len(run), self._max_operands):
                group = run[lo : lo + self._max_operands]
                if len(group) == 1:
                    self._touched.append(group[0])
                    continue
                request = self._merge(group)
                if request is not None:
                    requests.append(request)
        return requests

    def result(self, total: int) -> tuple[bool, bytes | None]:
        """Once all ``total`` leaves are in: ``(True, value)`` when the fold is
        complete, with ``value`` None when an ``empty()`` task is needed
        (empty input, or every element skipped). ``(False, None)`` otherwise."""
        if self.leaves < total or self.combines_in_flight:
            return False, None
        if total == 0:
            return True, None
        seg = self._by_start.get(0)
        if seg is None or seg.end != total or seg.busy:
            return False, None
        return True, seg.value

    # ------------------------------------------------------------- private

    def _insert(self, seg: Segment) -> None:
        self._by_start[seg.start] = seg
        self._by_end[seg.end] = seg
        if not seg.busy:
            self._touched.append(seg)

    def _remove(self, seg: Segment) -> None:
        del self._by_start[seg.start]
        del self._by_end[seg.end]

    def _ready_run(self, seg: Segment) -> list[Segment]:
        first = seg
        while (left := self._by_end.get(first.start)) is not None and not left.busy:
            first = left
        run = [first]
        while (right := self._by_start.get(run[-1].end)) is not None and not right.busy:
            run.append(right)
        return run

    def _merge(self, group: list[Segment]) -> CombineRequest | None:
        for seg in group:
            self._remove(seg)
        start, end = group[0].start, group[-1].end
        operands = [seg.value for seg in group if seg.value is not None]
        if len(operands) >= 2:
            self._insert(Segment(start, end, None, busy=True))
            self.combines_in_flight += 1
            return CombineRequest(start, end, operands)
        # Identities vanish: nothing, or a single real value, needs no task.
        self._insert(Segment(start, end, operands[0] if operands else None))
        return None
