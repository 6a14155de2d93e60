"""The blocking Client driven by grpcio-testing's channel: the test plays the server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import msgpack
import pytest
from squire import Client, DirectiveFailed, IndexedStream, Skipped
from squire.api.v1 import squire_pb2 as pb

SERVICES = pb.DESCRIPTOR.services_by_name
GET_STATUS = SERVICES["StatusService"].methods_by_name["GetStatus"]
RUN_DIRECTIVE = SERVICES["DirectiveService"].methods_by_name["RunDirective"]


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel(SERVICES.values(), grpc_testing.strict_real_time())


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def test_status(channel: Any, pool: ThreadPoolExecutor) -> None:
    client = Client(channel=channel, session=False)  # drives RunDirective itself
    future = pool.submit(client.status)
    _, request, rpc = channel.take_unary_unary(GET_STATUS)
    assert request == pb.GetStatusRequest()
    rpc.terminate(
        pb.GetStatusResponse(
            state="running",
            workers=[pb.WorkerStatus(worker_id="w1", operations=["fib_at"], capacity=2)],
            queues=[pb.QueueStatus(operation="fib_at", depth=3)],
            queue_depth=3,
            directives=[
                pb.DirectiveStatus(
                    directive_id="d1", plan="map(fib_at)", progress=pb.Progress(total=9)
                )
            ],
        ),
        (),
        grpc.StatusCode.OK,
        "",
    )
    status = future.result(timeout=10)
    assert status["state"] == "running"
    assert status["queue_depth"] == 3  # a number, not ProtoJSON's string
    assert status["queues"] == [{"operation": "fib_at", "depth": 3}]
    assert status["workers"] == [
        {
            "worker_id": "w1",
            "operations": ["fib_at"],
            "monoids": [],
            "capacity": 2,
            "window": 0,
            "in_flight": 0,
            "completed": 0,
            "connected_seconds": 0.0,
            "peer": "",
            "executing": 0,
            "buffered": 0,
            "version": "",
        }
    ]
    assert status["directives"][0]["progress"]["total"] == 9
    assert status["channels"] == []


def test_status_error(channel: Any, pool: ThreadPoolExecutor) -> None:
    client = Client(channel=channel, session=False)  # drives RunDirective itself
    future = pool.submit(client.status)
    _, _, rpc = channel.take_unary_unary(GET_STATUS)
    rpc.terminate(pb.GetStatusResponse(), (), grpc.StatusCode.UNAVAILABLE, "draining")
    with pytest.raises(Exception, match="draining") as info:
        future.result(timeout=10)
    assert info.value.code == "UNAVAILABLE"  # type: ignore[attr-defined]


def _take_plan_and_inputs(rpc: Any) -> tuple[pb.Plan, list[bytes]]:
    first = rpc.take_request()
    assert first.WhichOneof("kind") == "plan"
    second = rpc.take_request()
    assert second.WhichOneof("kind") == "inputs"
    rpc.requests_closed()
    return first.plan, list(second.inputs.items)


def test_directive_plan_inputs_and_events(channel: Any, pool: ThreadPoolExecutor) -> None:
    client = Client(channel=channel, session=False)  # drives RunDirective itself
    stream = IndexedStream.from_iterable([1, 2, 3]).map("multiply_by", factor=2)
    future = pool.submit(stream.run, client, serializer="msgpack")

    _, rpc = channel.take_stream_stream(RUN_DIRECTIVE)
    plan, items = _take_plan_and_inputs(rpc)
    assert plan.serializer == pb.SERIALIZER_MSGPACK
    assert plan.expected_items == 3
    assert plan.stages[0].map.operation == "multiply_by"
    assert msgpack.unpackb(plan.stages[0].map.params) == {"factor": 2}
    assert [msgpack.unpackb(item) for item in items] == [1, 2, 3]

    pack = msgpack.packb
    rpc.send_response(pb.DirectiveEvent(started=pb.DirectiveStarted(directive_id="d1")))
    rpc.send_response(
        pb.DirectiveEvent(
            items=pb.ItemBatch(
                items=[
                    pb.IndexedResult(index=2, value=pack(6)),
                    pb.IndexedResult(index=1, skipped=True, error="ValueError: odd"),
                ]
            )
        )
    )
    rpc.send_response(pb.DirectiveEvent(progress=pb.Progress(received=3, completed=2)))
    rpc.send_response(
        pb.DirectiveEvent(items=pb.ItemBatch(items=[pb.IndexedResult(index=0, value=pack(2))]))
    )
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert future.result(timeout=10) == [2, Skipped(1, "ValueError: odd"), 6]


def test_directive_failure(channel: Any, pool: ThreadPoolExecutor) -> None:
    client = Client(channel=channel, session=False)  # drives RunDirective itself
    stream = IndexedStream.from_iterable([0]).map("fib_at").fold("sum")
    future = pool.submit(stream.run, client)
    _, rpc = channel.take_stream_stream(RUN_DIRECTIVE)
    plan, _ = _take_plan_and_inputs(rpc)
    assert plan.stages[1].fold.monoid == "sum"
    rpc.terminate((), grpc.StatusCode.ABORTED, "Fatal operation error: ZeroDivisionError: boom")
    with pytest.raises(DirectiveFailed, match=r"^Fatal operation error: ZeroDivisionError: boom$"):
        future.result(timeout=10)


def test_a_directive_missing_results_is_an_error(channel: Any, pool: ThreadPoolExecutor) -> None:
    client = Client(channel=channel, session=False)  # drives RunDirective itself
    future = pool.submit(IndexedStream.from_iterable([1, 2]).map("fib_at").run, client)
    _, rpc = channel.take_stream_stream(RUN_DIRECTIVE)
    _take_plan_and_inputs(rpc)
    rpc.send_response(
        pb.DirectiveEvent(items=pb.ItemBatch(items=[pb.IndexedResult(index=0, value=b"1")]))
    )
    rpc.terminate((), grpc.StatusCode.OK, "")
    with pytest.raises(Exception, match=r"1 results for 2 inputs; missing indices \[1\]"):
        future.result(timeout=10)
