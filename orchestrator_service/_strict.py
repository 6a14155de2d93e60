"""A strict wire: a request frame that does not parse as its protobuf
message is answered INVALID_ARGUMENT with a message of ours, on every
squire.api.v1 method, unary or streaming.

Left to itself grpc answers such a frame with UNKNOWN (streaming requests:
the parse error surfaces inside the servicer) or INTERNAL ("Exception
deserializing request!"). The interceptor swaps each handler's request
deserializer for one that never raises: an unparsable frame becomes an
:class:`Undecodable` value, which the wrapped handler turns into the
status before the servicer sees it. The rest of the service is untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from squire.api.v1 import squire_pb2 as pb

_PREFIX = f"/{pb.DESCRIPTOR.package}."


class Undecodable:
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # pb.X.FromString is bound to X
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the request message"))


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, and anything a broken frame raises
            return Undecodable(len(data))

    return deserialize


def _slot(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def strict(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with requests checked: an unparsable one ends the call
    with INVALID_ARGUMENT naming the method and the message type."""
    name = _message_name(handler.request_deserializer)

    def refusal(bad: Undecodable) -> str:
        return (f"{method}: a request of {bad.size} bytes does not parse as {name}; "
                "is the client built from this orchestrator's squire.api.v1 proto?")

    slot = _slot(handler)
    inner = getattr(handler, slot)

    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if type(request) is Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
            yield request

    async def check_one(request: Any, context: Any) -> Any:
        if type(request) is Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request))
        return checked(request, context) if handler.request_streaming else request

    # grpc.aio drives a handler by its kind (coroutine or async generator),
    # so the wrapper must be of the same kind as the servicer method.
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async for response in inner(await check_one(request, context), context):
                yield response

        behaviour: Callable[..., Any] = stream
    else:
        async def call(request: Any, context: Any) -> Any:
            return await inner(await check_one(request, context), context)

        behaviour = call
    return handler._replace(
        request_deserializer=_lenient(handler.request_deserializer), **{slot: behaviour}
    )


class StrictWireInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        if handler.request_deserializer is None:
            return handler
        return strict(handler, method)
