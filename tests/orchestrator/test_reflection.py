"""Server reflection on both protocols, as grpcurl and older clients use it:
``grpc.reflection.v1`` (grpcurl's first choice) and ``v1alpha``.

The README's grpcurl examples are replayed by a reflection-driven client
(grpcurl is in none of the package registries CI reaches): ``list`` lists the
services; ``-d '{}' .../GetStatus`` resolves the method's message types from
the server alone, builds the request from JSON and decodes the answer.
The two protocols' messages are the same field for field, so v1alpha's
message classes write and read the v1 method's bytes here too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as rpb
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

PROTOCOLS = ["grpc.reflection.v1", "grpc.reflection.v1alpha"]
SQUIRE_SERVICES = {
    "squire.api.v1.WorkerService", "squire.api.v1.ChannelService",
    "squire.api.v1.DirectiveService", "squire.api.v1.StatusService",
}


class Reflector:
    """A reflection client speaking one protocol version over a raw stream."""

    def __init__(self, channel: grpc.aio.Channel, protocol: str) -> None:
        self._call = channel.stream_stream(
            f"/{protocol}.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )

    async def ask(self, **request: str) -> rpb.ServerReflectionResponse:
        async def one() -> AsyncIterator[rpb.ServerReflectionRequest]:
            yield rpb.ServerReflectionRequest(**request)

        answers = [a async for a in self._call(one(), timeout=5)]
        assert len(answers) == 1
        assert not answers[0].HasField("error_response"), answers[0].error_response
        return answers[0]

    async def services(self) -> set[str]:
        answer = await self.ask(list_services="")
        return {s.name for s in answer.list_services_response.service}

    async def pool_for(self, symbol: str) -> descriptor_pool.DescriptorPool:
        """A pool holding the file that defines ``symbol`` and its imports,
        fetched from the server alone."""
        pool = descriptor_pool.DescriptorPool()
        files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        answer = await self.ask(file_containing_symbol=symbol)
        pending = list(answer.file_descriptor_response.file_descriptor_proto)
        while pending:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(pending.pop())
            files[fdp.name] = fdp
            for dep in fdp.dependency:
                if dep not in files:
                    more = await self.ask(file_by_filename=dep)
                    pending.extend(more.file_descriptor_response.file_descriptor_proto)
        added: set[str] = set()

        def add(name: str) -> None:
            if name in added:
                return
            for dep in files[name].dependency:
                add(dep)
            pool.Add(files[name])
            added.add(name)

        for name in files:
            add(name)
        return pool


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_grpcurl_list(channel: grpc.aio.Channel, protocol: str) -> None:
    services = await Reflector(channel, protocol).services()
    assert services == SQUIRE_SERVICES | {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_grpcurl_call_get_status_from_json(channel: grpc.aio.Channel, protocol: str) -> None:
    pool = await Reflector(channel, protocol).pool_for("squire.api.v1.StatusService")
    method = pool.FindMethodByName("squire.api.v1.StatusService.GetStatus")
    assert method.input_type.full_name == "squire.api.v1.GetStatusRequest"
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse("{}", request_class())
    call = channel.unary_unary(
        "/squire.api.v1.StatusService/GetStatus",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    response = await call(request, timeout=5)
    as_json = json_format.MessageToDict(response)
    assert as_json["state"] == "running", as_json


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_streaming_method_resolves(channel: grpc.aio.Channel, protocol: str) -> None:
    # grpcurl resolves a method through its service's symbol, as here.
    pool = await Reflector(channel, protocol).pool_for("squire.api.v1.DirectiveService")
    method = pool.FindMethodByName("squire.api.v1.DirectiveService.RunDirective")
    assert (method.client_streaming, method.server_streaming) == (True, True)
    assert method.input_type.full_name == "squire.api.v1.DirectiveRequest"
    assert "plan" in method.input_type.fields_by_name
    assert method.output_type.full_name == "squire.api.v1.DirectiveEvent"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_both_reflection_services_describe_themselves(
    channel: grpc.aio.Channel, protocol: str
) -> None:
    reflector = Reflector(channel, protocol)
    for version in PROTOCOLS:
        pool = await reflector.pool_for(f"{version}.ServerReflection")
        method = pool.FindMethodByName(f"{version}.ServerReflection.ServerReflectionInfo")
        assert method.input_type.full_name == f"{version}.ServerReflectionRequest"
        assert "list_services" in method.input_type.fields_by_name


async def test_grpcio_reflection_client(target: str) -> None:
    """grpcio-reflection's own descriptor database (a blocking v1alpha client)."""

    def resolve() -> tuple[set[str], str]:
        with grpc.insecure_channel(target) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            service = pool.FindServiceByName("squire.api.v1.StatusService")
            method = service.methods_by_name["GetStatus"]
            return set(database.get_services()), method.output_type.full_name

    services, output = await asyncio.to_thread(resolve)
    assert SQUIRE_SERVICES <= services
    assert output == "squire.api.v1.GetStatusResponse"
