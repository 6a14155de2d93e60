"""gRPC server reflection on both protocol versions.

grpcio-reflection serves only ``grpc.reflection.v1alpha.ServerReflection``
(v1 is grpc/grpc#38576, open), while grpcurl, Postman and newer clients ask
for ``grpc.reflection.v1.ServerReflection`` first. The two protocols differ
only in their package name: every message, field and number is the same, so
one servicer answers both, with v1alpha's message classes reading and
writing the v1 method's bytes. The v1 file is added to the descriptor pool
(v1alpha's, with its package renamed), so a client can resolve the v1
service as it resolves any other.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` and both reflection services."""
    _add_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha.ServerReflectionRequest.FromString,
            response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
        ),
    }
    for name in (V1_SERVICE, V1ALPHA_SERVICE):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return  # added before (another server in this process), or by a real v1 module
    except KeyError:
        pass
    v1 = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(v1)
    old, new = f".{v1.package}.", ".grpc.reflection.v1."
    v1.name, v1.package = _V1_FILE, new.strip(".")
    v1.options.Clear()  # v1alpha's: deprecated, and its Java and Go package names
    # Type references are fully qualified (".grpc.reflection.v1alpha.X"); the
    # messages do not nest, so their fields and the methods are all there is.
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in v1.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    pool.AddSerializedFile(v1.SerializeToString())
