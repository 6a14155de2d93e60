"""Test helpers: a fake orchestrator, task builders, polling.

The fake orchestrator is a real ``grpc.aio`` server on 127.0.0.1, port 0,
implementing ``WorkerService.Connect``. It records what the worker sends and
lets a test push TaskBatches and worker IPC into the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from squire_kernel.serde import Serializer, encode
from worker_service import ExecutorKind, WorkerConfig

OPS = "worker.ops_for_tests"


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def task(
    operation: str,
    value: Any = None,
    *,
    key: str = "rk",
    task_id: int = 1,
    params: dict[str, Any] | None = None,
    serializer: Serializer = Serializer.JSON,
    lease_id: int = 0,
    timeout: float = 0.0,
) -> pb.Task:
    return pb.Task(
        routing_key=key,
        task_id=task_id,
        operation=operation,
        kind=pb.TASK_KIND_APPLY,
        params=encode(params, serializer) if params is not None else b"",
        input=encode(value, serializer),
        serializer=serializer.value,  # type: ignore[arg-type]
        lease_id=lease_id,
        timeout_seconds=timeout,
    )


def combine(
    monoid: str,
    operands: list[Any],
    *,
    key: str = "rk",
    task_id: int = 1,
    params: dict[str, Any] | None = None,
    serializer: Serializer = Serializer.JSON,
) -> pb.Task:
    return pb.Task(
        routing_key=key,
        task_id=task_id,
        operation=monoid,
        kind=pb.TASK_KIND_COMBINE,
        params=encode(params, serializer) if params is not None else b"",
        operands=[encode(o, serializer) for o in operands],
        serializer=serializer.value,  # type: ignore[arg-type]
    )


class FakeSession:
    """One Connect stream as the fake orchestrator sees it."""

    def __init__(self, hello: pb.WorkerHello) -> None:
        self.hello = hello
        self.messages: list[pb.WorkerMessage] = []
        self.outgoing: asyncio.Queue[pb.OrchestratorMessage | None] = asyncio.Queue()
        self.half_closed = asyncio.Event()  # the worker called done_writing
        self.ended = asyncio.Event()        # the RPC is over, however it ended

    # -- what the worker sent
    @property
    def results(self) -> list[pb.TaskResult]:
        return [r for m in self.messages if m.HasField("results") for r in m.results.results]

    @property
    def result_batches(self) -> list[pb.ResultBatch]:
        return [m.results for m in self.messages if m.HasField("results")]

    @property
    def credits(self) -> list[int]:
        return [m.credit.window for m in self.messages if m.HasField("credit")]

    @property
    def heartbeats(self) -> list[pb.Heartbeat]:
        return [m.heartbeat for m in self.messages if m.HasField("heartbeat")]

    def result(self, task_id: int, key: str = "rk") -> pb.TaskResult:
        matches = [r for r in self.results if r.task_id == task_id and r.routing_key == key]
        assert len(matches) == 1, f"task {key}/{task_id} reported {len(matches)} times"
        return matches[0]

    async def wait_results(self, n: int, timeout: float = 5.0) -> list[pb.TaskResult]:
        await wait_for(lambda: len(self.results) >= n, timeout, f"{n} results")
        return self.results

    # -- what the test sends
    def send_tasks(self, *tasks: pb.Task) -> None:
        self.outgoing.put_nowait(pb.OrchestratorMessage(tasks=pb.TaskBatch(tasks=tasks)))

    def send_ipc(self, ipc: pb.WorkerIpc) -> None:
        self.outgoing.put_nowait(pb.OrchestratorMessage(ipc=ipc))

    def end_stream(self) -> None:
        self.outgoing.put_nowait(None)


class FakeOrchestrator(pb_grpc.WorkerServiceServicer):
    def __init__(self, *, heartbeat_interval: float = 5.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.reject: grpc.StatusCode | None = None
        self.reject_times: int | None = None  # None: every hello
        self.sessions: list[FakeSession] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_WorkerServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(grace)

    async def session(self, n: int = 1, timeout: float = 10.0) -> FakeSession:
        """The n-th session (1-based), once the worker has said hello."""
        await wait_for(lambda: len(self.sessions) >= n, timeout, f"session {n}")
        return self.sessions[n - 1]

    async def Connect(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> None:
        first = await context.read()
        assert first.HasField("hello"), first
        session = FakeSession(first.hello)
        self.sessions.append(session)
        try:
            if self.reject is not None and self.reject_times != 0:
                if self.reject_times is not None:
                    self.reject_times -= 1
                await context.abort(self.reject, "rejected by the test")
            await context.write(pb.OrchestratorMessage(welcome=pb.Welcome(
                session_id=f"s{len(self.sessions)}",
                heartbeat_interval_seconds=self.heartbeat_interval,
            )))
            reader = asyncio.create_task(self._read(context, session))
            try:
                while (message := await session.outgoing.get()) is not None:
                    await context.write(message)
            finally:
                reader.cancel()
        finally:
            session.ended.set()

    async def _read(self, context: grpc.aio.ServicerContext, session: FakeSession) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                session.half_closed.set()
                session.end_stream()  # like the real orchestrator: end ours too
                return
            session.messages.append(message)


def config(fake: FakeOrchestrator, **overrides: Any) -> WorkerConfig:
    base = WorkerConfig(
        ops=(OPS,),
        orchestrator=fake.address,
        executor=ExecutorKind.INLINE,
        concurrency=2,
        worker_id="test-worker",
        drain_grace=5.0,
        reconnect_min=0.02,
        reconnect_max=0.2,
    )
    return replace(base, **overrides)


async def until(aw: Awaitable[Any], timeout: float = 5.0) -> Any:
    async with asyncio.timeout(timeout):
        return await aw
