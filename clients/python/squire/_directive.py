"""One RunDirective call: stream the plan and inputs out, events back.

The request side is a generator that gRPC pulls from as flow control allows,
so the input iterable is consumed lazily: a million-element generator is never
materialized, and results flow back while inputs are still being sent.
Both flavours use the blocking gRPC stack; ``squire._bridge`` says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from squire._bridge import BlockingInputs, call_soon
from squire._errors import RpcError, translate_rpc_error
from squire._feeder import DEFAULT_REATTACH_TIMEOUT, Feeder
from squire._model import DirectiveEvent, DirectiveStarted, Plan, Progress
from squire._wire import (
    ItemSink,
    Tally,
    directive_event,
)
from squire_kernel.serde import Serializer

if TYPE_CHECKING:
    from typing import Self

    from squire.api.v1 import squire_pb2_grpc as pb_grpc


def _code(exc: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    return code() if callable(code) else None


def _details(exc: grpc.RpcError) -> str:
    details = getattr(exc, "details", None)
    return (details() or "") if callable(details) else ""


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
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self.plan = plan
        self.directive_id: str | None = None
        self.progress: Progress | None = None
        self.finished = False
        self.reattached = 0  # times the call resumed after the orchestrator went away
        self._items_to = items_to
        self._stub = stub
        self._reattach_timeout = reattach_timeout
        self._tally = Tally()  # items received: values and skipped elements
        self._feeder = Feeder(plan, inputs)
        self._call = stub.RunDirective(self._feeder.requests())
        self._feeder.attach(self._call)

    @classmethod
    def attach(
        cls,
        stub: pb_grpc.DirectiveServiceStub,
        directive_id: str,
        *,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> DirectiveRun:
        """A run that attaches to a directive accepted earlier (detached, or
        left by its caller) and streams all of its results from the first."""
        run = cls.__new__(cls)
        run.plan = Plan(stages=())  # its serializer comes with DirectiveStarted
        run.directive_id = directive_id
        run.progress = None
        run.finished = False
        run.reattached = 0
        run._items_to = None
        run._stub = stub
        run._reattach_timeout = reattach_timeout
        run._tally = Tally()
        run._feeder = Feeder(run.plan, ())
        run._feeder.preload([])
        run._call = stub.RunDirective(run._feeder.attach_requests(directive_id, 0, 0))
        run._feeder.attach(run._call)
        run._attaching = True
        return run

    @classmethod
    def resume(
        cls,
        stub: pb_grpc.DirectiveServiceStub,
        plan: Plan,
        directive_id: str,
        *,
        sent: list[bytes],
        values: int,
        skipped: int,
        first: grpc.RpcError | RpcError,
        items_to: ItemSink | None = None,
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> DirectiveRun:
        """A run that reattaches to ``directive_id``, accepted with the
        encoded inputs ``sent`` (all of them), of which the caller has
        received ``values`` values and ``skipped`` skipped items."""
        run = cls.__new__(cls)
        run.plan = plan
        run.directive_id = directive_id
        run.progress = None
        run.finished = False
        run.reattached = 0
        run._items_to = items_to
        run._stub = stub
        run._reattach_timeout = reattach_timeout
        run._tally = Tally(values, skipped)
        run._feeder = Feeder(plan, ())
        run._feeder.preload(sent)
        run._reattach(first)
        return run

    @property
    def inputs_sent(self) -> int:
        """Input elements taken from the iterable so far (all of them once finished)."""
        return self._feeder.sent

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> DirectiveEvent:
        try:
            return self._next()
        except KeyboardInterrupt:
            self.cancel()
            # Ctrl-C lands in grpc's wait loop: the caller's traceback ends
            # here rather than walking a dozen frames of grpc internals.
            raise KeyboardInterrupt from None

    def _next(self) -> DirectiveEvent:
        while True:
            try:
                message = next(self._call)
            except StopIteration:
                self.finished = True
                raise
            except grpc.RpcError as exc:
                if self._may_reattach(exc):
                    self._reattach(exc)
                    continue
                self.finished = True
                if self._feeder.error is not None:
                    # The cancellation was ours, to stop the call: the cause is the input.
                    raise self._feeder.error from None
                raise translate_rpc_error(exc) from exc
            kind = message.WhichOneof("kind")
            if kind == "progress":
                self._feeder.acknowledge(message.progress.received)
            elif kind == "started" and message.started.attached:
                self._feeder.resumed(message.started.received, message.started.input_closed)
                if getattr(self, "_attaching", False):
                    # Attached by id: this is the caller's first sight of it.
                    self._attaching = False
                    self.plan = dataclasses.replace(
                        self.plan, serializer=Serializer.from_wire(message.started.serializer)
                    )
                    return DirectiveStarted(message.started.directive_id)
                continue  # the caller saw its directive start once
            try:
                event = directive_event(
                    message, self.plan.serializer, self._items_to, self._tally
                )
            except BaseException:
                self.cancel()
                raise
            if isinstance(event, DirectiveStarted):
                self.directive_id = event.directive_id
            elif isinstance(event, Progress):
                self.progress = event
            if event is not None:
                return event

    def _may_reattach(self, exc: grpc.RpcError) -> bool:
        return (
            _code(exc) is grpc.StatusCode.UNAVAILABLE
            and self.directive_id is not None  # it was accepted (journaled)
            and self._feeder.error is None
            and not self.finished
            and self._reattach_timeout > 0
        )

    def _reattach(self, first: grpc.RpcError | RpcError) -> None:
        """The orchestrator went away mid-directive: attach to it again, with
        backoff, until it answers or ``reattach_timeout`` passes."""
        deadline = time.monotonic() + self._reattach_timeout
        delay = 0.05
        error: grpc.RpcError | RpcError = first
        while time.monotonic() < deadline:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
            self._feeder.reset()
            assert self.directive_id is not None
            call = self._stub.RunDirective(
                self._feeder.attach_requests(
                    self.directive_id, self._tally.values, self._tally.skipped
                )
            )
            self._feeder.attach(call)
            try:
                message = next(call)
            except StopIteration:
                return
            except grpc.RpcError as exc:
                error = exc
                code = _code(exc)
                retry = code is grpc.StatusCode.UNAVAILABLE or (
                    code is grpc.StatusCode.FAILED_PRECONDITION
                    and "already has a caller" in (_details(exc))
                )
                if retry:
                    continue
                break
            self._call = call
            self.reattached += 1
            if message.WhichOneof("kind") == "started":
                self._feeder.resumed(message.started.received, message.started.input_closed)
            return
        self.finished = True
        if isinstance(error, RpcError):
            raise error
        raise translate_rpc_error(error) from None

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
        reattach_timeout: float = DEFAULT_REATTACH_TIMEOUT,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._inputs: BlockingInputs | None = None
        if isinstance(inputs, AsyncIterable):
            self._inputs = BlockingInputs(inputs, self._loop)
            inputs = self._inputs
        self._run = DirectiveRun(
            stub, plan, inputs, items_to=items_to, reattach_timeout=reattach_timeout
        )
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
