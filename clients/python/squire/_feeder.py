"""The request side of a RunDirective call: the plan, the input batches,
half-close; and what a call that reattaches must send again.

A :class:`_Feeder` keeps the encoded elements the orchestrator has not yet
confirmed as journaled, so a reattach after an orchestrator restart resends
exactly the inputs the journal lacks: no element lost, none sent twice.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from squire._model import Plan
from squire._wire import MAX_BATCH_ITEMS, InputBatcher, inputs_request, plan_request
from squire.api.v1 import squire_pb2 as pb

# How long a directive's call keeps trying to reattach when the orchestrator
# goes away (a restart, a failover); 0 turns reattaching off.
DEFAULT_REATTACH_TIMEOUT = 120.0


class Feeder:
    """The request stream: the plan, then input batches, then half-close.

    Runs in a gRPC thread, pulled as flow control allows. An error raised
    while pulling or encoding an input element is kept in ``error`` and the
    call is cancelled; the event reader then raises that error instead of the
    CANCELLED status it sees.

    It keeps the encoded elements the orchestrator has not yet confirmed as
    journaled (``acknowledge``), so that a call that reattaches after an
    orchestrator restart (``attach_requests``) resends exactly the inputs the
    journal lacks: no element is lost, none is sent twice.
    """

    def __init__(self, plan: Plan, inputs: Iterable[Any]) -> None:
        self._plan = plan
        self._source = iter(inputs)
        self._exhausted = False
        self._batcher = InputBatcher(plan.serializer)
        self.error: Exception | None = None
        self._call: Any = None
        self._attached = threading.Event()
        self._lock = threading.Lock()
        self._kept: deque[bytes] = deque()  # encoded elements from index _kept_from on
        self._kept_from = 0
        self._resume: tuple[int, bool] | None = None  # (journaled inputs, input closed)
        self._resumed = threading.Event()

    @property
    def sent(self) -> int:
        """Input elements taken from the iterable and encoded into batches so far."""
        return self._batcher.count

    def attach(self, call: Any) -> None:
        self._call = call
        self._attached.set()

    def acknowledge(self, journaled: int) -> None:
        """The orchestrator holds the first ``journaled`` elements for good."""
        with self._lock:
            while self._kept and self._kept_from < journaled:
                self._kept.popleft()
                self._kept_from += 1

    @property
    def exhausted(self) -> bool:
        """Every input element was taken from the iterable."""
        return self._exhausted

    def preload(self, sent: list[bytes]) -> None:
        """Every input was sent already (encoded): keep them, take no more."""
        self._kept.extend(sent)
        self._batcher.count = len(sent)
        self._exhausted = True

    def requests(self) -> Iterator[pb.DirectiveRequest]:
        yield plan_request(self._plan)
        yield from self._from_source()

    def attach_requests(
        self, directive_id: str, values: int, skipped: int
    ) -> Iterator[pb.DirectiveRequest]:
        """The request stream of a call that resumes ``directive_id``."""
        request = pb.DirectiveRequest()
        request.attach.directive_id = directive_id
        request.attach.values_received = values
        request.attach.skipped_received = skipped
        yield request
        if not self._resumed.wait(timeout=300.0) or self._resume is None:
            return
        journaled, closed = self._resume
        if closed:
            return
        self.acknowledge(journaled)
        with self._lock:
            kept = list(self._kept)[journaled - self._kept_from :]
        for lo in range(0, len(kept), MAX_BATCH_ITEMS):
            yield inputs_request(kept[lo : lo + MAX_BATCH_ITEMS])
        if not self._exhausted:
            yield from self._from_source()

    def resumed(self, journaled: int, closed: bool) -> None:
        """The attached call's DirectiveStarted: where the input goes on."""
        self._resume = (journaled, closed)
        self._resumed.set()

    def reset(self) -> None:
        self._resume = None
        self._resumed.clear()
        self._attached.clear()

    def _from_source(self) -> Iterator[pb.DirectiveRequest]:
        try:
            for request in self._batcher.requests(self._source):
                with self._lock:
                    self._kept.extend(request.inputs.items)
                yield request
            self._exhausted = True
        except Exception as exc:
            # Raising here would make gRPC log a traceback and fail the call
            # with a generic UNKNOWN; cancel it and report the real error.
            self.error = exc
            self._attached.wait(timeout=10.0)
            if self._call is not None:
                self._call.cancel()
