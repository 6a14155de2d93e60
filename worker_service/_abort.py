"""Abort signals handed to operations, and the memory of aborted routing keys."""

from __future__ import annotations

from collections.abc import Callable, MutableSequence


class AbortFlag:
    """An abort signal for inline and thread execution.

    A plain attribute rather than ``threading.Event``: a bool write is atomic
    under the GIL, and the operation only ever polls it.
    """

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class NeverAborted:
    """The signal for runs nothing can interrupt (inline execution)."""

    __slots__ = ()

    def is_set(self) -> bool:
        return False


NEVER_ABORTED = NeverAborted()


class SlotSignal:
    """An abort signal in a process-pool child: flag ``slot`` of a shared array.

    The parent sets the flag for the slot a task runs in, so a cooperative
    operation in another process sees the abort on its next poll, without any
    message passing (or Manager proxy) in between.
    """

    __slots__ = ("_flags", "_slot")

    def __init__(self, flags: MutableSequence[int], slot: int) -> None:
        self._flags = flags
        self._slot = slot

    def is_set(self) -> bool:
        return bool(self._flags[self._slot])


class AbortMemory:
    """Routing keys aborted within the last ``seconds``.

    Every key lives equally long, so insertion order is expiry order and
    pruning only ever looks at the oldest entries.
    """

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._seconds = seconds
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def remember(self, routing_key: str) -> None:
        # Re-inserting moves the key to the end, keeping expiry order.
        self._expiry.pop(routing_key, None)
        self._expiry[routing_key] = self._clock() + self._seconds
        self.prune()

    def prune(self) -> None:
        if not self._expiry:
            return
        now = self._clock()
        expired = []
        for key, expiry in self._expiry.items():
            if expiry > now:
                break
            expired.append(key)
        for key in expired:
            del self._expiry[key]

    def is_aborted(self, routing_key: str) -> bool:
        expiry = self._expiry.get(routing_key)
        if expiry is None:
            return False
        if expiry <= self._clock():
            del self._expiry[routing_key]
            return False
        return True

    def __len__(self) -> int:
        return len(self._expiry)

    def __bool__(self) -> bool:
        return bool(self._expiry)
