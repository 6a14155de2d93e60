"""TLS and mTLS on the orchestrator's port: the SDK and workers connect with
the CA (and a client certificate when required); plaintext and uncertified
peers are refused; probes keep a plaintext health-only port."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path

import grpc
import procs
import pytest
import squire
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squire import AsyncClient, Client, IndexedStream
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._security import SecurityConfig
from worker_service._runtime import WorkerRuntime

from .conftest import (
    CLIENT_TOKEN,
    WORKER_TOKEN,
    orchestrator,
    target,
    tls_credentials,
    wait_for,
    worker_config,
    write_lines,
)
from .pki import Pki


def tls(pki: Pki, *, mtls: bool = False, tokens: bool = False) -> SecurityConfig:
    return SecurityConfig(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca) if mtls else None, require_worker_client_cert=mtls,
        worker_tokens=(WORKER_TOKEN,) if tokens else (),
        client_tokens=(CLIENT_TOKEN,) if tokens else (),
    )


async def test_tls_clients_and_worker_run_a_directive(pki: Pki) -> None:
    async with orchestrator(security=tls(pki, tokens=True)) as orch:
        config = worker_config(orch, tls_ca=str(pki.ca), token=WORKER_TOKEN)
        async with WorkerRuntime(config) as worker:
            await wait_for(lambda: worker.ready, message="the TLS worker to be welcomed")
            async with AsyncClient(target(orch), tls_ca=pki.ca, token=CLIENT_TOKEN) as client:
                assert (await client.status())["state"] == "running"
                stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
                assert await stream.run_async(client) == 143

            def blocking() -> object:  # the blocking client, PEM given as bytes
                with Client(target(orch), tls_ca=pki.ca.read_bytes(), token=CLIENT_TOKEN) as c:
                    return stream.run(c)

            assert await asyncio.to_thread(blocking) == 143


async def test_plaintext_to_the_tls_port_fails(pki: Pki) -> None:
    async with orchestrator(security=tls(pki)) as orch:
        async with grpc.aio.insecure_channel(target(orch)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.StatusServiceStub(channel).GetStatus(
                    pb.GetStatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        # The SDK translates it; the port keeps serving TLS clients.
        async with AsyncClient(target(orch)) as plain:
            with pytest.raises(squire.Unavailable):
                await plain.status(timeout=5)
        async with AsyncClient(target(orch), tls_ca=pki.ca) as client:
            assert (await client.status())["state"] == "running"


async def test_a_certificate_from_another_ca_is_not_trusted_by_the_client(pki: Pki) -> None:
    async with orchestrator(security=tls(pki)) as orch:
        async with AsyncClient(target(orch), tls_ca=pki.rogue_ca) as client:
            with pytest.raises(squire.Unavailable):
                await client.status(timeout=5)


async def test_mtls_refuses_a_worker_without_a_client_certificate(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="worker_service")
    async with orchestrator(security=tls(pki, mtls=True)) as orch:
        for name, extra in (
            ("no-cert", {}),
            ("rogue", {"tls_cert": str(pki.rogue_cert), "tls_key": str(pki.rogue_key)}),
        ):
            caplog.clear()
            config = worker_config(orch, worker_id=name, tls_ca=str(pki.ca), **extra)
            async with WorkerRuntime(config) as worker:
                await wait_for(
                    lambda: sum("cannot connect" in r.getMessage() for r in caplog.records) >= 2,
                    message=f"worker {name} to fail connecting twice",
                )
                assert not worker.ready
                assert not orch.router.workers
        # A worker with a certificate signed by the CA connects.
        config = worker_config(orch, worker_id="certified", tls_ca=str(pki.ca),
                               tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
        async with WorkerRuntime(config) as worker:
            await wait_for(lambda: worker.ready, message="the certified worker")
            assert set(orch.router.workers) == {"certified"}


async def test_mtls_applies_to_every_peer_of_the_port(pki: Pki) -> None:
    async with orchestrator(security=tls(pki, mtls=True)) as orch:
        async with AsyncClient(target(orch), tls_ca=pki.ca) as client:
            with pytest.raises(squire.Unavailable):
                await client.status(timeout=5)
        async with AsyncClient(target(orch), tls_ca=pki.ca, tls_cert=pki.client_cert,
                               tls_key=pki.client_key) as client:
            assert (await client.status())["state"] == "running"


async def test_health_port_serves_probes_in_plaintext_and_nothing_else(pki: Pki) -> None:
    health_port = procs.free_port()
    async with orchestrator(security=tls(pki, mtls=True), health_port=health_port) as orch:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.StatusServiceStub(channel).GetStatus(
                    pb.GetStatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # Health on the TLS port still answers without a token (probes, tooling).
        creds = tls_credentials(pki, client_cert=True)
        async with grpc.aio.secure_channel(target(orch), creds) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_sdk_credentials_are_validated(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Client("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="not PEM"):
        Client("127.0.0.1:1", tls_ca=b"not a certificate")
    with pytest.raises(ValueError, match="whitespace"):
        Client("127.0.0.1:1", token="two words")
    with (grpc.insecure_channel("127.0.0.1:1") as channel,
          pytest.raises(ValueError, match="injected channel")):
        Client(channel=channel, token=CLIENT_TOKEN)
    # repr never shows the token or key material
    with Client("127.0.0.1:1", tls_ca=pki.ca, token=CLIENT_TOKEN) as client:
        assert CLIENT_TOKEN not in repr(client)


def test_processes_with_mtls_and_tokens(tmp_path: Path, pki: Pki) -> None:
    """The entry points: an mTLS orchestrator, a certified worker, one without
    a certificate, and the SDK and ``squire status`` with certificates."""
    worker_token = write_lines(tmp_path / "worker-token", WORKER_TOKEN)
    client_token = write_lines(tmp_path / "client-token", CLIENT_TOKEN)
    args = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
            "--tls-client-ca", str(pki.ca), "--require-worker-client-cert",
            "--worker-token-file", str(worker_token), "--client-token-file", str(client_token))
    trust = ("--tls-ca", str(pki.ca), "--token-file", str(worker_token), "--executor", "thread")
    cert = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    with procs.cluster(orchestrator_args=args) as c:
        c.start_worker("certified", wait=False, extra=(*trust, *cert))
        c.start_worker("uncertified", wait=False, extra=trust)
        with Client(c.target, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                    tls_key=str(pki.client_key), token=CLIENT_TOKEN) as client:
            procs.wait_until(lambda: client.status()["workers"], message="a worker to connect")
            procs.wait_until(lambda: c.log("worker-uncertified").count("cannot connect") >= 2,
                             message="the uncertified worker to fail twice")
            assert [w["worker_id"] for w in client.status()["workers"]] == ["certified"]
            assert IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum").run(
                client) == 143
        status = subprocess.run(
            [procs.entry_point("squire"), "status", "--target", c.target, "--json",
             "--tls-ca", str(pki.ca), *cert, "--token-file", str(client_token)],
            capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["workers"][0]["worker_id"] == "certified"
        assert c.workers["uncertified"].poll() is None  # still retrying, never admitted


async def test_a_renewed_certificate_is_used_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    """The certificate files are replaced (as cert-manager renews a Secret):
    the next connection gets the new certificate; an open one goes on."""
    from .pki import make_pki

    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    security = SecurityConfig(tls_cert=str(cert), tls_key=str(key))
    (tmp_path / "renewed").mkdir()
    renewed = make_pki(tmp_path / "renewed")  # another CA: the old one cannot verify it
    async with orchestrator(security=security) as orch:
        async with AsyncClient(target(orch), tls_ca=pki.ca) as old:
            assert (await old.status())["state"] == "running"
            cert.write_bytes(renewed.server_cert.read_bytes())
            key.write_bytes(renewed.server_key.read_bytes())
            async with AsyncClient(target(orch), tls_ca=renewed.ca) as new:
                assert (await new.status(timeout=10))["state"] == "running"
            async with AsyncClient(target(orch), tls_ca=pki.ca) as stale:
                with pytest.raises(squire.Unavailable):
                    await stale.status(timeout=5)
            # The connection made before the renewal goes on.
            assert (await old.status())["state"] == "running"
