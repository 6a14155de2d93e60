"""One RunDirective call: stream the plan and inputs out, events back.

The request side is a generator that gRPC pulls from as flow control allows,
so the input iterable is consumed lazily: a million-element generator is never
materialized, and results flow back while inputs are still being sent.
Both flavours use the blocking gRPC stack; ``squire._bridge`` says why.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._bridge import BlockingInputs, call_soon
from squire._errors import translate_rpc_error
from squire._model import DirectiveEvent, DirectiveStarted, Plan, Progress
from squire._wire import InputBatcher, ItemSink, directive_event, plan_request
from squire.api.v1 import squire_pb2 as pb

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc


class _Feeder:
    """The request stream: the plan, then input batches, then half-close.

    Runs in a gRPC thread, pulled as flow control allows. An error raised
    while pulling or encoding an input element is kept in ``error`` and the
    call is cancelled; the event reader then raises that error instead of the
    CANCELLED status it sees.
    """

    def __init__(self, plan: Plan, inputs: Iterable[Any]) -> None:
        self._plan = plan
        self._inputs = inputs
        self._batcher = InputBatcher(plan.serializer)
        self.error: Exception | None = None
        self._call: Any = None
        self._attached = threading.Event()

    @property
    def sent(self) -> int:
        """Input elements taken from the iterable and encoded into batches so far."""
        return self._batcher.count

    def attach(self, call: Any) -> None:
        self._call = call
        self._attached.set()

    def requests(self) -> Iterator[pb.DirectiveRequest]:
        yield plan_request(self._plan)
        try:
            yield from self._batcher.requests(self._inputs)
        except Exception as exc:
            # Raising here would make gRPC log a traceback and fail the call
            # with a generic UNKNOWN; cancel it and report the real error.
            self.error = exc
            self._attached.wait(timeout=10.0)
            if self._call is not None:
                self._call.cancel()


class DirectiveRun:
    """A directive running on the orchestrator, driven by a blocking :class:`Client`.

    Iterate it for :data:`DirectiveEvent` values (``DirectiveStarted`` first,
    then ``ItemBatch`` / ``Progress`` and, for a fold, one ``FoldValue``); the
    iteration ends when the directive is done. A fatal operation error raises
    :class:`DirectiveFailed`, other failures the matching :class:`RpcError`,
    and an error from the input iterable is re-raised as is.

    ``directive_id`` and the latest ``progress`` are kept as attributes.
    Leaving the ``with`` block (or :meth:`cancel`) before the end cancels the
    directive: the orchestrator drops its queued tasks and aborts running ones.

    With ``items_to`` (IndexedStream.run's gathering), item events go to it
    instead of being yielded as ItemBatch events.
    """

    def __init__(
        self,
        stub: pb_grpc.DirectiveServiceStub,
        plan: Plan,
        inputs: Iterable[Any],
        *,
        items_to: ItemSink | None = None,
    ) -> None:
        self.plan = plan
        self.directive_id: str | None = None
        self.progress: Progress | None = None
        self.finished = False
        self._items_to = items_to
        self._feeder = _Feeder(plan, inputs)
        self._call = stub.RunDirective(self._feeder.requests())
        self._feeder.attach(self._call)

    @property
    def inputs_sent(self) -> int:
        """Input elements taken from the iterable so far (all of them once finished)."""
        return self._feeder.sent

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> DirectiveEvent:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self.finished = True
                raise
            except grpc.RpcError as exc:
                self.finished = True
                if self._feeder.error is not None:
                    # The cancellation was ours, to stop the call: the cause is the input.
                    raise self._feeder.error from None
                raise translate_rpc_error(exc) from exc
            try:
                event = directive_event(message, self.plan.serializer, self._items_to)
            except BaseException:
                self.cancel()
                raise
            if isinstance(event, DirectiveStarted):
                self.directive_id = event.directive_id
            elif isinstance(event, Progress):
                self.progress = event
            if event is not None:
                return event

    def cancel(self) -> None:
        """Cancel the directive if it is still running. Idempotent."""
        if not self.finished:
            self.finished = True
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


@dataclass(frozen=True)
class _End:
    """The pump's last message: the directive ended, with ``error`` or cleanly."""

    error: BaseException | None


class AsyncDirectiveRun:
    """The asyncio twin of :class:`DirectiveRun`: ``async for`` and ``async with``.

    ``inputs`` may be a plain or an async iterable. The call runs on the
    blocking gRPC stack in a thread of its own (see ``squire._bridge`` for
    why); events reach the loop a few at a time, as they are consumed.
    ``items_to`` is called on that thread.
    """

    _PREFETCH = 4  # events the pump thread may read ahead of the consumer

    def __init__(
        self,
        stub: pb_grpc.DirectiveServiceStub,
        plan: Plan,
        inputs: Iterable[Any] | AsyncIterable[Any],
        *,
        items_to: ItemSink | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._inputs: BlockingInputs | None = None
        if isinstance(inputs, AsyncIterable):
            self._inputs = BlockingInputs(inputs, self._loop)
            inputs = self._inputs
        self._run = DirectiveRun(stub, plan, inputs, items_to=items_to)
        self._events: asyncio.Queue[DirectiveEvent | _End] = asyncio.Queue()
        self._credits = threading.Semaphore(self._PREFETCH)
        self._end: _End | None = None
        self.plan = plan
        self.directive_id: str | None = None
        self.progress: Progress | None = None
        threading.Thread(target=self._pump, name="squire-directive", daemon=True).start()

    @property
    def finished(self) -> bool:
        return self._end is not None

    @property
    def inputs_sent(self) -> int:
        """Input elements taken from the iterable so far (all of them once finished)."""
        return self._run.inputs_sent

    def _pump(self) -> None:
        # The only code on this thread: read events, hand them to the loop.
        try:
            while True:
                self._credits.acquire()
                call_soon(self._loop, self._events.put_nowait, next(self._run))
        except StopIteration:
            call_soon(self._loop, self._events.put_nowait, _End(None))
        except BaseException as exc:
            call_soon(self._loop, self._events.put_nowait, _End(exc))

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DirectiveEvent:
        if self._end is None:
            item = await self._events.get()
            self._credits.release()
            if not isinstance(item, _End):
                if isinstance(item, DirectiveStarted):
                    self.directive_id = item.directive_id
                elif isinstance(item, Progress):
                    self.progress = item
                return item
            self._end = item
        if self._end.error is not None:
            raise self._end.error
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Cancel the directive if it is still running. Idempotent."""
        if self._end is None:
            self._run.cancel()
            if self._inputs is not None:
                self._inputs.cancel()
            self._credits.release()  # the pump may be waiting for a credit

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()
