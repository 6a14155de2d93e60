"""A result channel and the per-operation queue depths. Pure state.

A channel's id is the routing key of every task published to it. Its queued
tasks wait in one FIFO per (task kind, operation), served latest directive
stage first: finishing elements beats starting new ones (memory, latency);
fold combines outrank every map stage.
"""

from __future__ import annotations

from collections import deque

from orchestrator_service._model import QueueKey, TaskRecord

FOLD_PRIORITY = 1 << 30  # a fold task's stage (negative) ranks above any map stage


class OpDepth:
    """Queued tasks of one (kind, operation) across channels, and since when
    no connected worker offers it."""

    __slots__ = ("depth", "unserved_since")

    def __init__(self) -> None:
        self.depth = 0
        self.unserved_since: float | None = None


class Channel:
    def __init__(
        self, channel_id: str, now: float, *, directive: bool = False, tenant: str = "",
        priority: int = 0,
    ) -> None:
        self.id = channel_id
        self.tenant = tenant  # whose tasks these are (the fair share's unit)
        self.priority = priority  # served first within its tenant when higher
        self.created_at = now
        self.directive = directive  # leased by a directive, not by a client
        self.sender_closed = False
        self.published = 0
        self.completed = 0
        self.queued = 0
        self.leased = 0  # tasks at workers
        self.unread = 0  # results emitted to the servicer, not yet taken by a subscriber
        self.pending_ids: set[int] = set()  # external channels: ids without a result yet
        self.ids: set[int] = set()  # external channels: every id published (no duplicates)
        self.fifos: dict[QueueKey, deque[TaskRecord]] = {}
        self._priority: dict[QueueKey, int] = {}

    def _fifo(self, key: QueueKey, stage: int) -> deque[TaskRecord]:
        fifo = self.fifos.get(key)
        if fifo is None:
            fifo = self.fifos[key] = deque()
            self._priority[key] = stage if stage >= 0 else FOLD_PRIORITY
            if len(self.fifos) > 1:
                self.fifos = dict(
                    sorted(self.fifos.items(), key=lambda kv: -self._priority[kv[0]])
                )
        return fifo

    def push(
        self, tasks: list[TaskRecord], depths: dict[QueueKey, OpDepth], *, front: bool = False
    ) -> None:
        """Queue ``tasks`` (to the front when they are re-queued: they have
        waited longest); ``depths`` is kept in step."""
        # Tasks nearly always come in runs of one key (a batch of inputs, or
        # results of one stage): one fifo and one depth update per run.
        i = 0
        n = len(tasks)
        while i < n:
            first = tasks[i]
            kind, operation = first.kind, first.operation
            j = i + 1
            while j < n and tasks[j].operation == operation and tasks[j].kind == kind:
                j += 1
            key = (kind, operation)
            fifo = self._fifo(key, first.stage)
            run = tasks[i:j] if i or j < n else tasks
            if front:
                fifo.extendleft(reversed(run))
            else:
                fifo.extend(run)
            depth = depths.get(key)
            if depth is None:
                depth = depths[key] = OpDepth()
            depth.depth += j - i
            i = j
        self.queued += n

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

    def take_key(self, key: QueueKey, depths: dict[QueueKey, OpDepth]) -> list[TaskRecord]:
        """Every queued task of ``key``."""
        fifo = self.fifos.pop(key, None)
        if not fifo:
            return []
        self.queued -= len(fifo)
        depths[key].depth -= len(fifo)
        return list(fifo)

    def drop_queued(self, depths: dict[QueueKey, OpDepth]) -> int:
        dropped = 0
        for key, fifo in self.fifos.items():
            depths[key].depth -= len(fifo)
            dropped += len(fifo)
        self.fifos.clear()
        self.queued = 0
        return dropped

    @property
    def drained(self) -> bool:
        """The sender is closed and every published task has its result."""
        return self.sender_closed and self.completed == self.published
