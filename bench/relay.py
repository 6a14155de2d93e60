"""W4, the ceiling: Squire's topology with none of its logic.

A client streams input batches to a relay process; the relay forwards each
batch to one of its echo workers over a bidirectional stream (round-robin);
the echoes come back and the relay streams them to the client. Message shapes
and batching are Squire's own (DirectiveRequest/InputBatch in, TaskBatch to
workers, ResultBatch back, DirectiveEvent/ItemBatch out), built the fastest
way Python protobuf allows (in place with add(), fields set one by one, as
Squire's services build them), on the same event loop as
the services (uvloop when installed), so the gap between W1 and W4 is
exactly what Squire's routing logic costs.

    python bench/relay.py relay --port-file F     # the relay
    python bench/relay.py echo --target HOST:PORT # an echo worker
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from squire_kernel import loop as _loop

OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class Relay(pb_grpc.WorkerServiceServicer, pb_grpc.DirectiveServiceServicer):
    def __init__(self) -> None:
        self.workers: list[asyncio.Queue[pb.OrchestratorMessage]] = []
        self.routes: dict[str, asyncio.Queue[pb.DirectiveEvent | None]] = {}
        self._ids = itertools.count()

    async def Connect(self, request_iterator, context):  # type: ignore[no-untyped-def]
        outbox: asyncio.Queue[pb.OrchestratorMessage] = asyncio.Queue()
        self.workers.append(outbox)

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("results"):
                    results = msg.results.results
                    route = self.routes.get(results[0].routing_key) if results else None
                    if route is not None:
                        event = pb.DirectiveEvent()
                        add = event.items.items.add
                        for r in results:
                            item = add()
                            item.index = r.task_id
                            item.value = r.ok.output
                        route.put_nowait(event)

        reader = asyncio.create_task(read())
        try:
            while True:
                await context.write(await outbox.get())
        finally:
            reader.cancel()

    async def RunDirective(self, request_iterator, context):  # type: ignore[no-untyped-def]
        if len(self.workers) < 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "waiting for 2 echo workers")
        key = f"d{next(self._ids)}"
        route: asyncio.Queue[pb.DirectiveEvent | None] = asyncio.Queue()
        self.routes[key] = route
        sent = 0
        received = 0
        done_reading = False

        async def read() -> None:
            nonlocal sent, done_reading
            rr = itertools.cycle(range(len(self.workers)))
            async for req in request_iterator:
                if not req.HasField("inputs"):
                    continue
                message = pb.OrchestratorMessage()
                add = message.tasks.tasks.add
                for item in req.inputs.items:
                    task = add()
                    task.routing_key = key
                    task.task_id = sent
                    task.operation = "echo"
                    task.input = item
                    sent += 1
                self.workers[next(rr)].put_nowait(message)
            done_reading = True
            route.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while not (done_reading and received == sent):
                event = await route.get()
                if event is None:
                    continue
                received += len(event.items.items)
                await context.write(event)
        finally:
            reader.cancel()
            del self.routes[key]


async def relay(port_file: Path) -> None:
    server = grpc.aio.server(options=OPTIONS)
    r = Relay()
    pb_grpc.add_WorkerServiceServicer_to_server(r, server)
    pb_grpc.add_DirectiveServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(port_file)
    await server.wait_for_termination()


async def echo(target: str) -> None:
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        outbox: asyncio.Queue[pb.WorkerMessage] = asyncio.Queue()
        await outbox.put(pb.WorkerMessage(hello=pb.WorkerHello(worker_id="echo", operations=["echo"], capacity=1)))

        async def requests() -> AsyncIterator[pb.WorkerMessage]:
            while True:
                yield await outbox.get()

        async for msg in pb_grpc.WorkerServiceStub(channel).Connect(requests()):
            if msg.HasField("tasks"):
                reply = pb.WorkerMessage()
                add = reply.results.results.add
                for t in msg.tasks.tasks:
                    result = add()
                    result.routing_key = t.routing_key
                    result.task_id = t.task_id
                    result.lease_id = t.lease_id
                    result.ok.output = t.input
                outbox.put_nowait(reply)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("relay").add_argument("--port-file", type=Path, required=True)
    sub.add_parser("echo").add_argument("--target", required=True)
    args = p.parse_args()
    if args.cmd == "relay":
        _loop.run(relay(args.port_file))
    else:
        _loop.run(echo(args.target))


if __name__ == "__main__":
    main()
