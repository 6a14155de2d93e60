"""Shared pieces of the security tests: a throwaway PKI, random tokens, an
in-process orchestrator with chosen security settings, polling helpers."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._model import RouterConfig
from orchestrator_service._security import Limits, SecurityConfig
from orchestrator_service._server import Orchestrator, OrchestratorConfig
from worker_service._config import ExecutorKind, WorkerConfig

from .pki import Pki, make_pki

# Random per run: a token found in a log cannot be there by coincidence.
WORKER_TOKEN = "wt-" + secrets.token_hex(16)
WORKER_TOKEN_OLD = "wt-old-" + secrets.token_hex(16)
CLIENT_TOKEN = "ct-" + secrets.token_hex(16)
CLIENT_TOKEN_2 = "ct2-" + secrets.token_hex(16)
CLIENT_TOKEN_3 = "ct3-" + secrets.token_hex(16)
ALL_TOKENS = (WORKER_TOKEN, WORKER_TOKEN_OLD, CLIENT_TOKEN, CLIENT_TOKEN_2, CLIENT_TOKEN_3)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def wait_for(predicate: Callable[[], object], timeout: float = 15.0,
                   message: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def orchestrator(*, security: SecurityConfig | None = None, limits: Limits | None = None,
                       router: RouterConfig | None = None, **config: Any,
                       ) -> AsyncIterator[Orchestrator]:
    cfg = OrchestratorConfig(
        port=0, grace=0.5, tick_interval=0.05,
        security=security or SecurityConfig(), limits=limits or Limits(),
        router=router or RouterConfig(no_worker_timeout=60.0), **config,
    )
    async with Orchestrator(cfg) as orch:
        yield orch


def target(orch: Orchestrator) -> str:
    return f"127.0.0.1:{orch.port}"


def worker_config(orch: Orchestrator, worker_id: str = "w1", **kw: Any) -> WorkerConfig:
    """An in-process worker running squire_examples.ops inline, reconnecting fast."""
    return WorkerConfig(
        ops=("squire_examples.ops",), orchestrator=target(orch), concurrency=1,
        executor=ExecutorKind.INLINE, worker_id=worker_id, reconnect_min=0.05,
        reconnect_max=0.2, handshake_timeout=5.0, **kw,
    )


def tls_credentials(pki: Pki, *, client_cert: bool = False) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(), private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes())


def hello(worker_id: str, capacity: int = 1) -> pb.WorkerMessage:
    return pb.WorkerMessage(hello=pb.WorkerHello(
        worker_id=worker_id, operations=["fib_at"], monoids=["sum"], capacity=capacity))


@contextlib.asynccontextmanager
async def worker_stream(channel: grpc.aio.Channel, worker_id: str, token: str | None = None,
                        ) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    """A raw worker stream that says hello and then stays open until the block ends."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[pb.WorkerMessage]:
        yield hello(worker_id)
        await done.wait()

    call = pb_grpc.WorkerServiceStub(channel).Connect(requests(), metadata=bearer(token))
    try:
        yield call
    finally:
        done.set()
        call.cancel()


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
