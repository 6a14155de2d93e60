"""gRPC status codes become squire exceptions in one place, with code and details kept."""

from __future__ import annotations

import socket

import grpc
import pytest
from squire import (
    AccessDenied,
    AlreadyExists,
    AsyncClient,
    Cancelled,
    Client,
    DirectiveFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from squire._errors import translate_rpc_error

from .fake_orchestrator import FakeServer

EXPECTED: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.ABORTED: DirectiveFailed,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    # No dedicated class: the base RpcError, code kept.
    grpc.StatusCode.UNKNOWN: RpcError,
    grpc.StatusCode.INTERNAL: RpcError,
    grpc.StatusCode.UNIMPLEMENTED: RpcError,
    grpc.StatusCode.DATA_LOSS: RpcError,
    grpc.StatusCode.OUT_OF_RANGE: RpcError,
}


class _StatusError(grpc.RpcError):  # type: ignore[misc]
    """What gRPC raises: an RpcError that is also a Call with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def test_every_status_code_is_covered() -> None:
    assert set(EXPECTED) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_translation(code: grpc.StatusCode) -> None:
    error = translate_rpc_error(_StatusError(code, "what went wrong"))
    assert type(error) is EXPECTED[code]
    assert error.code == code.name
    assert str(error) == error.message == "what went wrong"


def test_missing_details_and_a_bare_rpc_error() -> None:
    error = translate_rpc_error(_StatusError(grpc.StatusCode.INTERNAL, None))
    assert error.message == "the orchestrator answered INTERNAL without details"
    bare = translate_rpc_error(grpc.RpcError())
    assert type(bare) is RpcError and bare.code == "UNKNOWN"


@pytest.mark.parametrize("code", list(EXPECTED), ids=lambda c: c.name)
def test_codes_from_a_server_blocking(
    code: grpc.StatusCode, client: Client, fake: FakeServer
) -> None:
    fake.servicer.script.fail_with = (code, f"scripted {code.name}")
    with pytest.raises(EXPECTED[code]) as info:
        client.status()
    assert info.value.code == code.name
    assert str(info.value) == f"scripted {code.name}"
    assert isinstance(info.value.__cause__, grpc.RpcError)  # raise ... from exc


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED], ids=lambda c: c.name
)
async def test_codes_from_a_server_async(
    code: grpc.StatusCode, aclient: AsyncClient, fake: FakeServer
) -> None:
    fake.servicer.script.fail_with = (code, "scripted")
    with pytest.raises(EXPECTED[code], match=r"^scripted$"):
        await aclient.status()
    with pytest.raises(EXPECTED[code], match=r"^scripted$"):
        await aclient.lease_channel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_no_orchestrator_is_unavailable() -> None:
    with Client(f"127.0.0.1:{_free_port()}") as client, pytest.raises(Unavailable):
        client.status(timeout=5)


def test_a_client_without_an_address_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"pass the orchestrator's address, e\.g\. Client\("):
        Client()
    with grpc.insecure_channel("127.0.0.1:1") as channel, \
            pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", channel=channel)
