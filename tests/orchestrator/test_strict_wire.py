"""A frame that is not the method's protobuf message: INVALID_ARGUMENT with a
message naming the method and the type, on unary and streaming methods
alike; the service stays up and other calls are untouched."""

from __future__ import annotations

import grpc
import pytest
from squire.api.v1 import squire_pb2 as pb

from orchestrator_service._server import Orchestrator

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message parses from it


def identity(data: bytes) -> bytes:
    return data


async def expect_invalid(call: object, method: str, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert method in details and message in details, details
    assert "DecodeError" not in details and "Traceback" not in details


@pytest.mark.parametrize("method,message", [
    ("/squire.api.v1.StatusService/GetStatus", "squire.api.v1.GetStatusRequest"),
    ("/squire.api.v1.ChannelService/LeaseChannel", "squire.api.v1.LeaseChannelRequest"),
])
async def test_an_unparsable_unary_request(
    channel: grpc.aio.Channel, method: str, message: str
) -> None:
    call = channel.unary_unary(method, request_serializer=identity,
                               response_deserializer=identity)(GARBAGE, timeout=5)
    await expect_invalid(call, method, message)


@pytest.mark.parametrize("method,message", [
    ("/squire.api.v1.DirectiveService/RunDirective", "squire.api.v1.DirectiveRequest"),
    ("/squire.api.v1.DirectiveService/RunDirectives", "squire.api.v1.SessionRequest"),
    ("/squire.api.v1.WorkerService/Connect", "squire.api.v1.WorkerMessage"),
])
async def test_an_unparsable_streamed_request(
    channel: grpc.aio.Channel, method: str, message: str
) -> None:
    call = channel.stream_stream(method, request_serializer=identity,
                                 response_deserializer=identity)(iter([GARBAGE]), timeout=5)

    async def drain() -> None:
        async for _ in call:
            pass

    await expect_invalid(drain(), method, message)


async def test_the_service_stays_up(channel: grpc.aio.Channel,
                                    orchestrator: Orchestrator) -> None:
    bad = channel.unary_unary("/squire.api.v1.StatusService/GetStatus",
                              request_serializer=identity, response_deserializer=identity)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await bad(GARBAGE, timeout=5)
    good = channel.unary_unary(
        "/squire.api.v1.StatusService/GetStatus",
        request_serializer=pb.GetStatusRequest.SerializeToString,
        response_deserializer=pb.GetStatusResponse.FromString,
    )
    status = await good(pb.GetStatusRequest(), timeout=5)
    assert status.state == "running"
