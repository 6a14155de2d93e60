"""A scripted stand-in for the orchestrator, to test the SDK on its own.

It implements the client-facing services (DirectiveService, ChannelService,
StatusService) on a ``grpc.aio`` server bound to 127.0.0.1:0, running in its
own thread and event loop so blocking and asyncio clients can both call it.
Operations are evaluated locally with ``squire_examples.ops``; a
:class:`Script` tells it where to deviate (skip an element, fail, abort).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from squire import Registry
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from squire_kernel.serde import Serializer, decode, decode_params, encode

REGISTRY = Registry.from_modules(["squire_examples.ops"])


@dataclass
class Script:
    """How the fake deviates from a well-behaved orchestrator."""

    # Every RPC fails at once with this status.
    fail_with: tuple[grpc.StatusCode, str] | None = None
    # Map elements reported as skipped (FatalStrategy.IGNORE).
    skip_indices: set[int] = field(default_factory=set)
    # The element whose operation "fails fatally": the call ends ABORTED.
    fail_index: int | None = None
    # After this many input batches, end the call with (code, details)
    # without reading any further input.
    abort_after_batches: tuple[int, grpc.StatusCode, str] | None = None


@dataclass
class _Channel:
    id: str
    changed: asyncio.Event
    results: list[pb.TaskResult] = field(default_factory=list)
    delivered: int = 0
    sender_closed: bool = False


class FakeOrchestrator(
    pb_grpc.DirectiveServiceServicer, pb_grpc.ChannelServiceServicer, pb_grpc.StatusServiceServicer
):
    def __init__(self) -> None:
        self.script = Script()
        self.status = pb.GetStatusResponse(state="running", version="fake")
        self.plans: list[pb.Plan] = []
        self.batch_sizes: list[int] = []
        self.cancelled_directives: list[str] = []
        self.channels: dict[str, _Channel] = {}
        self.released: list[str] = []
        self.published: dict[str, list[pb.TaskSpec]] = {}  # kept after release
        self._leased = 0

    async def _fail_if_scripted(self, context: grpc.aio.ServicerContext) -> None:
        if self.script.fail_with is not None:
            await context.abort(*self.script.fail_with)

    # ------------------------------------------------------------ status

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        await self._fail_if_scripted(context)
        return self.status

    # --------------------------------------------------------- directives

    async def RunDirective(
        self, request_iterator: AsyncIterator[pb.DirectiveRequest], context: Any
    ) -> AsyncIterator[pb.DirectiveEvent]:
        await self._fail_if_scripted(context)
        requests = aiter(request_iterator)
        first = await anext(requests)
        if first.WhichOneof("kind") != "plan":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "the first request must be a plan"
            )
        plan = first.plan
        serializer = Serializer.from_wire(plan.serializer)
        self.plans.append(plan)
        directive_id = f"directive-{len(self.plans)}"
        fold = plan.stages[-1].fold if plan.stages and plan.stages[-1].HasField("fold") else None
        for stage in plan.stages:
            if stage.HasField("map") and stage.map.operation not in REGISTRY.operations:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no worker offers operation {stage.map.operation!r}",
                )
        yield pb.DirectiveEvent(started=pb.DirectiveStarted(directive_id=directive_id))
        index = skipped = 0
        fold_values: list[Any] = []
        try:
            async for request in requests:
                self.batch_sizes.append(len(request.inputs.items))
                results = []
                for raw in request.inputs.items:
                    i, index = index, index + 1
                    if i in self.script.skip_indices:
                        skipped += 1
                        results.append(
                            pb.IndexedResult(index=i, skipped=True, error=f"ValueError: skip {i}")
                        )
                        continue
                    if i == self.script.fail_index:
                        await context.abort(
                            grpc.StatusCode.ABORTED,
                            f"Fatal operation error: ValueError: scripted failure at element {i}",
                        )
                    value = self._apply_maps(plan, decode(raw, serializer), serializer)
                    fold_values.append(value)
                    results.append(pb.IndexedResult(index=i, value=encode(value, serializer)))
                if fold is None and results:
                    # Completion order differs from input order.
                    yield pb.DirectiveEvent(items=pb.ItemBatch(items=results[::-1]))
                yield pb.DirectiveEvent(
                    progress=pb.Progress(received=index, completed=index, skipped=skipped)
                )
                scripted = self.script.abort_after_batches
                if scripted is not None and len(self.batch_sizes) >= scripted[0]:
                    await context.abort(scripted[1], scripted[2])
            yield pb.DirectiveEvent(
                progress=pb.Progress(
                    received=index, completed=index, skipped=skipped, total=index, tasks_done=index
                )
            )
            if fold is not None:
                monoid = REGISTRY.monoids[fold.monoid]
                params = decode_params(fold.params, serializer)
                value = monoid.combine_all(fold_values, **params)
                yield pb.DirectiveEvent(fold=pb.FoldValue(value=encode(value, serializer)))
        except (asyncio.CancelledError, GeneratorExit):
            # grpc.aio closes a streaming handler when the client cancels.
            self.cancelled_directives.append(directive_id)
            raise

    @staticmethod
    def _apply_maps(plan: pb.Plan, value: Any, serializer: Serializer) -> Any:
        for stage in plan.stages:
            if stage.HasField("map"):
                operation = REGISTRY.operations[stage.map.operation]
                value = operation(value, **decode_params(stage.map.params, serializer))
        return value

    # ----------------------------------------------------------- channels

    def _channel(self, channel_id: str) -> _Channel | None:
        return self.channels.get(channel_id)

    async def LeaseChannel(
        self, request: pb.LeaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LeaseChannelResponse:
        await self._fail_if_scripted(context)
        self._leased += 1
        channel = _Channel(id=f"channel-{self._leased}", changed=asyncio.Event())
        self.channels[channel.id] = channel
        return pb.LeaseChannelResponse(channel_id=channel.id)

    async def Publish(
        self, request_iterator: AsyncIterator[pb.PublishRequest], context: Any
    ) -> pb.PublishResponse:
        published = 0
        channel: _Channel | None = None
        async for request in request_iterator:
            if channel is None:
                channel = self._channel(request.channel_id)
                if channel is None:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND, f"unknown channel {request.channel_id!r}"
                    )
            assert channel is not None
            for task in request.tasks:
                self.published.setdefault(channel.id, []).append(task)
                channel.results.append(_execute(channel.id, task))
                published += 1
            channel.changed.set()
        return pb.PublishResponse(published=published)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Any
    ) -> AsyncIterator[pb.ResultBatch]:
        channel = self._channel(request.channel_id)
        if channel is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown channel {request.channel_id!r}"
            )
        assert channel is not None
        while True:
            if channel.delivered < len(channel.results):
                batch = channel.results[channel.delivered :]
                channel.delivered = len(channel.results)
                yield pb.ResultBatch(results=batch)
            elif channel.sender_closed:
                return
            else:
                channel.changed.clear()
                await channel.changed.wait()

    async def CloseChannel(
        self, request: pb.CloseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        channel = self._channel(request.channel_id)
        if channel is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown channel {request.channel_id!r}"
            )
        assert channel is not None
        channel.sender_closed = True
        channel.changed.set()
        return pb.CloseChannelResponse()

    async def ReleaseChannel(
        self, request: pb.ReleaseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseChannelResponse:
        if self.channels.pop(request.channel_id, None) is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown channel {request.channel_id!r}"
            )
        self.released.append(request.channel_id)
        return pb.ReleaseChannelResponse()


def _execute(routing_key: str, task: pb.TaskSpec) -> pb.TaskResult:
    serializer = Serializer.from_wire(task.serializer)
    result = pb.TaskResult(
        routing_key=routing_key, task_id=task.task_id, metadata=task.metadata, attempt=1
    )
    try:
        params = decode_params(task.params, serializer)
        if task.kind == pb.TASK_KIND_COMBINE:
            operands = [decode(o, serializer) for o in task.operands]
            value = REGISTRY.monoids[task.operation].combine_all(operands, **params)
        else:
            value = REGISTRY.operations[task.operation](decode(task.input, serializer), **params)
        result.ok.output = encode(value, serializer)
    except Exception as exc:
        result.err.CopyFrom(
            pb.ExecutionErr(
                error_type=type(exc).__name__,
                message=str(exc),
                kind=pb.ERROR_KIND_OPERATION,
                strategy=pb.FATAL_STRATEGY_TERMINATE,
            )
        )
    return result


class FakeServer:
    """Runs a FakeOrchestrator on 127.0.0.1:0 in a thread with its own event loop."""

    def __init__(self, servicer: FakeOrchestrator) -> None:
        self.servicer = servicer
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fake-orchestrator", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(timeout=10.0):
            raise TimeoutError("the fake orchestrator did not start within 10 s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10.0)
        assert not self._thread.is_alive(), "the fake orchestrator did not stop"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_DirectiveServiceServicer_to_server(self.servicer, server)
        pb_grpc.add_ChannelServiceServicer_to_server(self.servicer, server)
        pb_grpc.add_StatusServiceServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop(grace=None)
