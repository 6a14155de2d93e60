"""Token authentication: two roles that cannot be mixed, exact status codes,
open health and reflection, and tokens that never reach a log."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import procs
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from squire import Client, IndexedStream
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service.__main__ import parse_args
from orchestrator_service._core import Router
from orchestrator_service._interceptor import SecurityInterceptor
from orchestrator_service._model import RouterConfig
from orchestrator_service._security import (
    Limits,
    SecurityConfig,
    SecurityConfigError,
    load_tokens,
    security_from_args,
)
from worker_service._errors import HelloRejected
from worker_service._runtime import WorkerRuntime

from .conftest import (
    ALL_TOKENS,
    CLIENT_TOKEN,
    WORKER_TOKEN,
    WORKER_TOKEN_OLD,
    bearer,
    orchestrator,
    target,
    wait_for,
    worker_config,
    write_lines,
)

Metadata = tuple[tuple[str, str], ...]
Code = grpc.StatusCode


async def _no_requests() -> AsyncIterator[pb.PublishRequest]:
    return
    yield  # an async generator that ends at once


async def _status(ch: grpc.aio.Channel, md: Metadata) -> None:
    await pb_grpc.StatusServiceStub(ch).GetStatus(pb.GetStatusRequest(), metadata=md, timeout=5)


async def _lease(ch: grpc.aio.Channel, md: Metadata) -> None:
    await pb_grpc.ChannelServiceStub(ch).LeaseChannel(
        pb.LeaseChannelRequest(), metadata=md, timeout=5)


async def _publish(ch: grpc.aio.Channel, md: Metadata) -> None:
    await pb_grpc.ChannelServiceStub(ch).Publish(_no_requests(), metadata=md, timeout=5)


async def _subscribe(ch: grpc.aio.Channel, md: Metadata) -> None:
    call = pb_grpc.ChannelServiceStub(ch).Subscribe(
        pb.SubscribeRequest(channel_id="no-such-channel"), metadata=md, timeout=5)
    async for _ in call:
        pass


async def _run_directive(ch: grpc.aio.Channel, md: Metadata) -> None:
    async def requests() -> AsyncIterator[pb.DirectiveRequest]:
        yield pb.DirectiveRequest(plan=pb.Plan(stages=[pb.Stage(map=pb.MapStage(
            operation="fib_at"))]))

    async for _ in pb_grpc.DirectiveServiceStub(ch).RunDirective(
            requests(), metadata=md, timeout=5):
        pass


async def _connect(ch: grpc.aio.Channel, md: Metadata) -> None:
    done = asyncio.Event()

    async def requests() -> AsyncIterator[pb.WorkerMessage]:
        yield pb.WorkerMessage(hello=pb.WorkerHello(
            worker_id="matrix", operations=["fib_at"], capacity=1))
        await done.wait()

    call = pb_grpc.WorkerServiceStub(ch).Connect(requests(), metadata=md, timeout=5)
    try:
        first = await call.read()
        assert first.HasField("welcome")
    finally:
        done.set()
        call.cancel()


Call = Callable[[grpc.aio.Channel, Metadata], Awaitable[None]]
# method -> (how to call it, the token it needs, its status with that token)
CALLS: dict[str, tuple[Call, str, grpc.StatusCode]] = {
    "GetStatus": (_status, CLIENT_TOKEN, Code.OK),
    "LeaseChannel": (_lease, CLIENT_TOKEN, Code.OK),
    "Publish": (_publish, CLIENT_TOKEN, Code.OK),
    "Subscribe": (_subscribe, CLIENT_TOKEN, Code.NOT_FOUND),  # authorized, unknown channel
    "RunDirective": (_run_directive, CLIENT_TOKEN, Code.OK),
    "Connect": (_connect, WORKER_TOKEN, Code.OK),
}


def _presented(kind: str, right: str) -> Metadata:
    wrong_role = CLIENT_TOKEN if right == WORKER_TOKEN else WORKER_TOKEN
    return {
        "none": (),
        "wrong": bearer("not-a-token-" + "x" * 20),
        "malformed": (("authorization", f"Basic {right}"),),
        "wrong-role": bearer(wrong_role),
        "right": bearer(right),
    }[kind]


EXPECTED = {
    "none": Code.UNAUTHENTICATED,
    "wrong": Code.UNAUTHENTICATED,
    "malformed": Code.UNAUTHENTICATED,
    "wrong-role": Code.PERMISSION_DENIED,
}


async def code_of(call: Call, channel: grpc.aio.Channel, md: Metadata,
                  ) -> tuple[grpc.StatusCode, str]:
    try:
        await call(channel, md)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


def secured() -> SecurityConfig:
    return SecurityConfig(worker_tokens=(WORKER_TOKEN, WORKER_TOKEN_OLD),
                          client_tokens=(CLIENT_TOKEN,))


@pytest.mark.parametrize("kind", ["none", "wrong", "malformed", "wrong-role", "right"])
@pytest.mark.parametrize("method", list(CALLS))
async def test_token_matrix(method: str, kind: str) -> None:
    call, right, allowed = CALLS[method]
    async with orchestrator(security=secured()) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            code, details = await code_of(call, channel, _presented(kind, right))
    assert code is EXPECTED.get(kind, allowed), details
    assert not any(token in details for token in ALL_TOKENS)
    if kind == "wrong-role":
        assert "token may not call" in details
    elif kind != "right":
        assert "Bearer <token>" in details  # says how to authenticate


async def test_rotated_worker_tokens_are_all_accepted() -> None:
    async with orchestrator(security=secured()) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            for token in (WORKER_TOKEN, WORKER_TOKEN_OLD):
                assert await code_of(_connect, channel, bearer(token)) == (Code.OK, "")


async def test_health_and_reflection_stay_open() -> None:
    async with orchestrator(security=secured()) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            services = [s.name async for r in stub.ServerReflectionInfo(ask(), timeout=5)
                        for s in r.list_services_response.service]
            assert "squire.api.v1.StatusService" in services


async def test_no_tokens_means_auth_off_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="squire.orchestrator")
    async with orchestrator() as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            assert await code_of(_status, channel, ()) == (Code.OK, "")
            assert await code_of(_connect, channel, ()) == (Code.OK, "")
    assert "token authentication is off" in caplog.text


async def test_tokens_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with orchestrator(security=secured()) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            for call, right, _ in CALLS.values():
                for kind in ("none", "wrong", "malformed", "wrong-role", "right"):
                    await code_of(call, channel, _presented(kind, right))
    assert "token authentication on" in caplog.text
    everything = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for token in ALL_TOKENS:
        assert token not in everything
    assert not any(token in repr(secured()) for token in ALL_TOKENS)


def test_token_configuration() -> None:
    assert load_tokens(f"{WORKER_TOKEN}\n\n# old one, remove after the rollout\n"
                       f"  {WORKER_TOKEN_OLD}  \n", None) == (WORKER_TOKEN, WORKER_TOKEN_OLD)
    with pytest.raises(SecurityConfigError, match="both roles"):
        SecurityConfig(worker_tokens=(WORKER_TOKEN,), client_tokens=(WORKER_TOKEN,))
    with pytest.raises(SecurityConfigError, match="at least 16"):
        SecurityConfig(client_tokens=("short",))
    args = parse_args([])
    config = security_from_args(args, {"SQUIRE_WORKER_TOKEN": WORKER_TOKEN,
                                       "SQUIRE_CLIENT_TOKEN": CLIENT_TOKEN})
    assert (config.worker_tokens, config.client_tokens) == ((WORKER_TOKEN,), (CLIENT_TOKEN,))
    assert config.auth and not config.tls


# ------------------------------------------------------------------ processes

def _all_logs(log_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))


def test_processes_with_token_files(tmp_path: Path) -> None:
    worker_tokens = write_lines(tmp_path / "worker-tokens", WORKER_TOKEN, WORKER_TOKEN_OLD)
    client_tokens = write_lines(tmp_path / "client-tokens", CLIENT_TOKEN)
    new = write_lines(tmp_path / "new", WORKER_TOKEN)
    old = write_lines(tmp_path / "old", WORKER_TOKEN_OLD)
    mixed_up = write_lines(tmp_path / "client-token", CLIENT_TOKEN)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    args = ("--worker-token-file", str(worker_tokens), "--client-token-file", str(client_tokens),
            "--log-level", "DEBUG")
    with procs.cluster(orchestrator_args=args, log_dir=log_dir) as c:
        extra = ("--log-level", "DEBUG", "--executor", "thread")
        c.start_worker("w-new", wait=False, extra=(*extra, "--token-file", str(new)))
        c.start_worker("w-old", wait=False, extra=(*extra, "--token-file", str(old)))
        rejected = c.start_worker("w-client-token", wait=False,
                                  extra=(*extra, "--token-file", str(mixed_up)))
        with Client(c.target, token=CLIENT_TOKEN) as client:
            procs.wait_until(
                lambda: {w["worker_id"] for w in client.status()["workers"]} == {"w-new", "w-old"},
                message="both token generations to connect")
            stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
            assert stream.run(client) == 143
        # a client token on the worker stream: PERMISSION_DENIED, the worker gives up
        assert rejected.wait(timeout=30) == 3
        assert "PERMISSION_DENIED" in c.log("worker-w-client-token")
        # squire status: needs the client token too
        status = [procs.entry_point("squire"), "status", "--target", c.target, "--json"]
        denied = subprocess.run(status, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        allowed = subprocess.run([*status, "--token-file", str(mixed_up)],
                                 capture_output=True, text=True, timeout=60)
        assert allowed.returncode == 0, allowed.stderr
        for output in (denied.stdout, denied.stderr, allowed.stdout, allowed.stderr):
            assert not any(token in output for token in ALL_TOKENS)
    logs = _all_logs(log_dir)
    assert "token authentication on" in logs and "worker connected" in logs
    for token in ALL_TOKENS:
        assert token not in logs


@pytest.mark.parametrize(("token", "code"), [
    (None, "UNAUTHENTICATED"),
    ("not-a-token-" + "x" * 20, "UNAUTHENTICATED"),
    (CLIENT_TOKEN, "PERMISSION_DENIED"),
])
async def test_a_refused_worker_stops_instead_of_retrying(token: str | None, code: str) -> None:
    async with orchestrator(security=secured()) as orch:
        worker = WorkerRuntime(worker_config(orch, token=token))
        with pytest.raises(HelloRejected) as info:
            await asyncio.wait_for(worker.run(), 15)
        assert info.value.code == code
        assert not any(t in str(info.value) for t in ALL_TOKENS)
        async with WorkerRuntime(worker_config(orch, worker_id="ok", token=WORKER_TOKEN)) as ok:
            await wait_for(lambda: ok.ready, message="a worker with a worker token")


async def test_a_service_added_later_needs_a_client_token() -> None:
    """Fail closed: only health and reflection are open; any other service
    than the worker stream is a client API."""
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    interceptor = SecurityInterceptor(secured(), Limits(), Router(RouterConfig(), time.monotonic))
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "squire.api.v1.FutureService", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/squire.api.v1.FutureService/Echo")
            for token, code in ((None, Code.UNAUTHENTICATED), (WORKER_TOKEN, Code.PERMISSION_DENIED),
                                (CLIENT_TOKEN, Code.OK)):
                try:
                    assert await call(b"hi", metadata=bearer(token), timeout=5) == b"hi"
                    got = Code.OK
                except grpc.aio.AioRpcError as exc:
                    got = exc.code()
                assert got is code, token
    finally:
        await server.stop(0)
