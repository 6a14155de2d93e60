"""Tier 2: a real grpc.aio orchestrator on 127.0.0.1 inside the test process,
with in-test workers speaking the wire protocol directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from squire import Registry
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._model import RouterConfig
from orchestrator_service._server import Orchestrator, OrchestratorConfig
from squire_kernel.serde import Serializer, decode, decode_params, encode

REGISTRY = Registry.from_modules(["squire_examples.ops"])


async def wait_for(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def run_task(task: pb.Task) -> pb.TaskResult:
    ser = Serializer.from_wire(task.serializer)
    result = pb.TaskResult(
        routing_key=task.routing_key, task_id=task.task_id, lease_id=task.lease_id,
    )
    try:
        params = decode_params(task.params, ser)
        if task.kind == pb.TASK_KIND_APPLY:
            value = REGISTRY.operations[task.operation](decode(task.input, ser, what="input"), **params)
        else:
            values = [decode(o, ser, what="operand") for o in task.operands]
            value = REGISTRY.monoids[task.operation].combine_all(values, **params)
        result.ok.output = encode(value, ser)
    except Exception as exc:
        kind = pb.ERROR_KIND_BAD_PAYLOAD if "not valid" in str(exc) else pb.ERROR_KIND_OPERATION
        result.err.CopyFrom(pb.ExecutionErr(error_type=type(exc).__name__, message=str(exc), kind=kind))
    return result


class WireWorker:
    """A minimal worker speaking WorkerService.Connect, executing inline."""

    def __init__(self, target: str, worker_id: str, operations: list[str] | None = None,
                 monoids: list[str] | None = None, capacity: int = 4,
                 token: str | None = None) -> None:
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.worker_id = worker_id
        self.operations = operations if operations is not None else sorted(REGISTRY.operations)
        self.monoids = monoids if monoids is not None else sorted(REGISTRY.monoids)
        self.capacity = capacity
        self.executed: list[pb.Task] = []
        self.ipc: list[pb.WorkerIpc] = []
        self.welcomed = asyncio.Event()
        self._outbox: asyncio.Queue[pb.WorkerMessage | None] = asyncio.Queue()

    async def _requests(self) -> AsyncIterator[pb.WorkerMessage]:
        yield pb.WorkerMessage(hello=pb.WorkerHello(
            worker_id=self.worker_id, operations=self.operations, monoids=self.monoids,
            capacity=self.capacity, prefetch=self.capacity))
        while (msg := await self._outbox.get()) is not None:
            yield msg

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = pb_grpc.WorkerServiceStub(channel).Connect(self._requests(),
                                                              metadata=self.metadata)
            async for msg in call:
                kind = msg.WhichOneof("kind")
                if kind == "welcome":
                    self.welcomed.set()
                elif kind == "ipc":
                    self.ipc.append(msg.ipc)
                elif kind == "tasks":
                    self.executed.extend(msg.tasks.tasks)
                    results = [run_task(t) for t in msg.tasks.tasks]
                    await self._outbox.put(
                        pb.WorkerMessage(results=pb.ResultBatch(results=results)))

    def stop(self) -> None:
        self._outbox.put_nowait(None)


@pytest.fixture
async def orchestrator() -> AsyncIterator[Orchestrator]:
    config = OrchestratorConfig(
        port=0, grace=2.0, tick_interval=0.05,
        router=RouterConfig(no_worker_timeout=1.0, lease_timeout=2.0),
    )
    async with Orchestrator(config) as orch:
        yield orch


@pytest.fixture
async def target(orchestrator: Orchestrator) -> str:
    return f"127.0.0.1:{orchestrator.port}"


@pytest.fixture
async def workers(target: str, orchestrator: Orchestrator) -> AsyncIterator[list[WireWorker]]:
    ws = [WireWorker(target, "w1"), WireWorker(target, "w2")]
    tasks = [asyncio.create_task(w.run()) for w in ws]
    await wait_for(lambda: len(orchestrator.router.workers) == 2)
    yield ws
    for w in ws:
        w.stop()
    for t in tasks:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await t


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target) as ch:
        yield ch
