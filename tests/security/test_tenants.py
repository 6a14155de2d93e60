"""Tenants on the wire (issue 17), in-process: a real grpc.aio orchestrator
with a tenants file and a SQLite journal. Isolation matrix: list, attach,
cancel, status and the channel calls across two tenants and an operator;
another tenant's id is NOT_FOUND, exactly as an unknown one. Quotas name
the tenant. Ownership is journaled: a restart keeps it. The file itself:
every mistake is refused at start-up with a message naming it."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from orchestrator.conftest import WireWorker
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._security import SecurityConfig
from orchestrator_service._security import reload as reload_security
from orchestrator_service._tenants import TenantsError, parse_tenants
from squire_kernel.serde import decode, encode

from .conftest import WORKER_TOKEN as WORKER
from .conftest import bearer, orchestrator, target
from .pki import Pki

ALPHA = "alpha-" + secrets.token_hex(16)
BETA = "beta-" + secrets.token_hex(16)
OPS = "ops-" + secrets.token_hex(16)
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TENANTS = f"""
[tenants.alpha]
token_sha256 = ["{sha(ALPHA)}"]
weight = 2
max_directives = 2

[tenants.beta]
token_sha256 = ["{sha(BETA)}"]

[tenants.ops]
token_sha256 = ["{sha(OPS)}"]
admin = true
"""


def security() -> SecurityConfig:
    return SecurityConfig(tenants=parse_tenants(TENANTS, "tenants.toml"))


class As:
    """The stubs of one caller."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.md = bearer(token)
        self.directives = pb_grpc.DirectiveServiceStub(channel)
        self.channels = pb_grpc.ChannelServiceStub(channel)
        self.status = pb_grpc.StatusServiceStub(channel)

    async def submit(self) -> str:
        plan = pb.Plan(serializer=pb.SERIALIZER_JSON, detached=True)
        plan.stages.add().map.operation = "fib_at"
        call = self.directives.RunDirective(iter([
            pb.DirectiveRequest(plan=plan),
            pb.DirectiveRequest(inputs=pb.InputBatch(items=[encode(i) for i in range(3)])),
        ]), metadata=self.md)
        directive_id = ""
        async for event in call:  # leave once the inputs are journaled
            kind = event.WhichOneof("kind")
            if kind == "started":
                directive_id = event.started.directive_id
            elif kind == "progress" and event.progress.received == 3:
                break
        call.cancel()
        return directive_id

    async def listed(self) -> dict[str, str]:
        response = await self.directives.ListDirectives(pb.ListDirectivesRequest(),
                                                        metadata=self.md)
        return {d.directive_id: d.tenant for d in response.directives}

    async def attach(self, directive_id: str) -> pb.DirectiveStarted:
        call = self.directives.RunDirective(iter([pb.DirectiveRequest(
            attach=pb.AttachDirective(directive_id=directive_id))]), metadata=self.md)
        try:
            event = await call.read()
            return event.started
        finally:
            call.cancel()

    async def cancel(self, directive_id: str) -> None:
        await self.directives.CancelDirective(
            pb.CancelDirectiveRequest(directive_id=directive_id), metadata=self.md)

    async def seen_in_status(self) -> tuple[set[str], set[str]]:
        response = await self.status.GetStatus(pb.GetStatusRequest(), metadata=self.md)
        return ({d.directive_id for d in response.directives},
                {c.channel_id for c in response.channels if not c.directive})


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_isolation_matrix(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'journal.db'}"
    async with orchestrator(security=security(), store=store) as orch, \
            grpc.aio.insecure_channel(target(orch)) as channel:
        alpha, beta, ops = As(channel, ALPHA), As(channel, BETA), As(channel, OPS)
        mine, theirs = await alpha.submit(), await beta.submit()

        # list: one's own; the operator every tenant's, with the tenant named
        assert await alpha.listed() == {mine: "alpha"}
        assert await beta.listed() == {theirs: "beta"}
        assert await ops.listed() == {mine: "alpha", theirs: "beta"}
        # status: the same
        assert (await alpha.seen_in_status())[0] == {mine}
        assert (await ops.seen_in_status())[0] == {mine, theirs}
        # attach: one's own works; another tenant's id is as unknown as a made-up one
        assert (await alpha.attach(mine)).attached
        other = await refused(alpha.attach(theirs))
        unknown = await refused(alpha.attach("0" * 32))
        assert other.code() is NOT_FOUND and unknown.code() is NOT_FOUND
        assert other.details().replace(theirs, "ID") == unknown.details().replace("0" * 32, "ID")
        assert (await ops.attach(theirs)).attached
        # cancel: not another tenant's; the operator may
        assert (await refused(alpha.cancel(theirs))).code() is NOT_FOUND
        assert theirs in await beta.listed()
        await ops.cancel(theirs)

        # channels: another tenant's channel id is NOT_FOUND for every call
        leased = await alpha.channels.LeaseChannel(pb.LeaseChannelRequest(), metadata=alpha.md)
        cid = leased.channel_id
        assert (await alpha.seen_in_status())[1] == {cid}
        assert not (await beta.seen_in_status())[1]
        task = pb.TaskSpec(task_id=1, operation="fib_at", input=encode(3),
                           serializer=pb.SERIALIZER_JSON)
        for call in (
            beta.channels.Publish(iter([pb.PublishRequest(channel_id=cid, tasks=[task])]),
                                  metadata=beta.md),
            beta.channels.CloseChannel(pb.CloseChannelRequest(channel_id=cid), metadata=beta.md),
            beta.channels.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=cid),
                                         metadata=beta.md),
        ):
            assert (await refused(call)).code() is NOT_FOUND
        subscribe = beta.channels.Subscribe(pb.SubscribeRequest(channel_id=cid),
                                            metadata=beta.md)
        assert (await refused(subscribe.read())).code() is NOT_FOUND
        assert cid in orch.router.channels  # untouched by the refusals
        published = await alpha.channels.Publish(
            iter([pb.PublishRequest(channel_id=cid, tasks=[task])]), metadata=alpha.md)
        assert published.published == 1
        await alpha.channels.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=cid),
                                            metadata=alpha.md)


async def test_max_directives_names_the_tenant() -> None:
    async with orchestrator(security=security()) as orch, \
            grpc.aio.insecure_channel(target(orch)) as channel:
        alpha, beta = As(channel, ALPHA), As(channel, BETA)
        plan = pb.Plan(serializer=pb.SERIALIZER_JSON)
        plan.stages.add().map.operation = "fib_at"
        done = asyncio.Event()

        async def open_input() -> AsyncIterator[pb.DirectiveRequest]:
            yield pb.DirectiveRequest(plan=plan)
            await done.wait()  # the input stays open: the directive runs on

        held = [alpha.directives.RunDirective(open_input(), metadata=alpha.md)
                for _ in range(2)]
        for call in held:
            assert (await call.read()).WhichOneof("kind") == "started"
        third = alpha.directives.RunDirective(open_input(), metadata=alpha.md)
        err = await refused(third.read())
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'alpha'" in (err.details() or "")
        assert "max_directives (2" in (err.details() or "")
        # beta's quota is its own
        other = beta.directives.RunDirective(open_input(), metadata=beta.md)
        assert (await other.read()).WhichOneof("kind") == "started"
        assert len(orch.router.directives) == 3
        done.set()
        for call in [*held, other]:
            call.cancel()


async def test_ownership_survives_a_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'journal.db'}"
    async with orchestrator(security=security(), store=store) as first, \
            grpc.aio.insecure_channel(target(first)) as channel:
        mine = await As(channel, ALPHA).submit()
        cid = (await As(channel, ALPHA).channels.LeaseChannel(
            pb.LeaseChannelRequest(), metadata=bearer(ALPHA))).channel_id
    async with orchestrator(security=security(), store=store) as again, \
            grpc.aio.insecure_channel(target(again)) as channel:
        alpha, beta = As(channel, ALPHA), As(channel, BETA)
        assert await alpha.listed() == {mine: "alpha"}
        assert await beta.listed() == {}
        assert (await refused(beta.attach(mine))).code() is NOT_FOUND
        assert (await alpha.seen_in_status())[1] == {cid}
        assert again.router.channels[cid].tenant == "alpha"


@pytest.mark.parametrize(("text", "message"), [
    ("[tenants.a]\nweight = 1\n", "token_sha256: a list"),
    ('[tenants.a]\ntoken_sha256 = ["secret-token"]\n', "not 64 hex digits"),
    (f'[tenants.a]\ntoken_sha256 = ["{sha("x")}"]\nweight = 0\n', "weight: an integer from 1"),
    (f'[tenants.a]\ntoken_sha256 = ["{sha("x")}"]\nmax_queued = 5\n', "unknown key(s) ['max_queued']"),
    (f'[tenants.a]\ntoken_sha256 = ["{sha("x")}"]\n[tenants.b]\ntoken_sha256 = ["{sha("x")}"]\n',
     "a token names one tenant"),
    ("[tenants]\n", "no tenants"),
    ("tenants = [", "not valid TOML"),
    (f'[tenants."a b"]\ntoken_sha256 = ["{sha("x")}"]\n', "tenant name 'a b'"),
    (f'[tenants.a]\ntoken_sha256 = ["{sha("x")}"]\nadmin = "yes"\n', "admin: true or false"),
])
def test_a_bad_tenants_file_is_refused_naming_the_mistake(text: str, message: str) -> None:
    with pytest.raises(TenantsError) as err:
        parse_tenants(text, "t.toml")
    assert message in str(err.value) and "'t.toml'" in str(err.value)


def test_the_orchestrator_refuses_to_start_on_a_bad_tenants_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "tenants.toml"
    bad.write_text('[tenants.a]\ntoken_sha256 = ["plain-token"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator_service", "--port", "0", "--store", "memory:",
         "--tenants", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not 64 hex digits" in done.stderr and str(bad) in done.stderr


async def test_a_rotated_token_works_at_once_and_the_revoked_one_is_refused(
    tmp_path: Path,
) -> None:
    """Replace alpha's token in the tenants file while its detached
    directive runs: the new token works within a second or two, the
    directive runs on, an open call made with the old token ends with
    UNAUTHENTICATED, and the old token is refused from then on."""
    file = tmp_path / "tenants.toml"
    new_token = "alpha-new-" + secrets.token_hex(16)
    file.write_text(TENANTS)
    config = reload_security(SecurityConfig(tenants_file=str(file), worker_tokens=(WORKER,)))
    store = f"sqlite:///{tmp_path / 'journal.db'}"
    async with orchestrator(security=config, store=store, credentials_poll=0.05) as orch, \
            grpc.aio.insecure_channel(target(orch)) as channel:
        old, new = As(channel, ALPHA), As(channel, new_token)
        directive_id = await old.submit()  # no worker yet: it waits
        held = old.directives.RunDirective(iter([pb.DirectiveRequest(
            attach=pb.AttachDirective(directive_id=directive_id))]), metadata=old.md)
        assert (await held.read()).started.attached  # an open call on the old token

        file.write_text(TENANTS.replace(sha(ALPHA), sha(new_token)))
        rotated = asyncio.get_running_loop().time()

        async def works() -> bool:
            try:
                return directive_id in await new.listed()
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                return False

        while not await works():
            assert asyncio.get_running_loop().time() - rotated < 5, "the new token never worked"
            await asyncio.sleep(0.02)
        took = asyncio.get_running_loop().time() - rotated
        assert took < 2.0, f"the new token worked {took:.2f} s after the rotation"
        # The old token's open call ended; its new calls are refused.
        ended = await refused(held.read())
        assert ended.code() is grpc.StatusCode.UNAUTHENTICATED and "revoked" in ended.details()
        assert (await refused(old.listed())).code() is grpc.StatusCode.UNAUTHENTICATED
        # The directive ran on: a worker joins and the new token reads it to the end.
        assert directive_id in orch.router.directives
        worker = WireWorker(target(orch), "w1", token=WORKER)
        running = asyncio.create_task(worker.run())
        try:
            call = new.directives.RunDirective(iter([pb.DirectiveRequest(
                attach=pb.AttachDirective(directive_id=directive_id))]), metadata=new.md)
            values = {}
            async for event in call:
                if event.WhichOneof("kind") == "items":
                    values.update({i.index: decode(i.value) for i in event.items.items})
            assert values == {0: 0, 1: 1, 2: 1}
        finally:
            worker.stop()
            running.cancel()
        assert orch.reloads == 1


def test_sighup_reloads_the_tenants_file(tmp_path: Path) -> None:
    """The file is rewritten in place with its old size and modification
    time, which the once-a-second look cannot see: SIGHUP reloads it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    file = tmp_path / "tenants.toml"
    file.write_text(TENANTS)
    port_file = tmp_path / "port"
    new_token = "alpha-" + secrets.token_hex(16)  # the same length as ALPHA
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator_service", "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--store", "memory:", "--metrics-port", "0",
         "--tenants", str(file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no port file"
            time.sleep(0.02)
        channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}")
        status = pb_grpc.StatusServiceStub(channel)

        def works(token: str) -> bool:
            try:
                status.GetStatus(pb.GetStatusRequest(), metadata=bearer(token), timeout=5)
                return True
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
                return False

        assert works(ALPHA) and not works(new_token)
        before = os.stat(file)
        with open(file, "r+") as f:  # in place: the same inode
            f.write(TENANTS.replace(sha(ALPHA), sha(new_token)))
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert os.stat(file).st_size == before.st_size
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not works(new_token):
            assert time.monotonic() < deadline, "SIGHUP did not reload the tenants file"
            time.sleep(0.02)
        assert not works(ALPHA)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_an_mtls_client_certificate_names_its_tenant(pki: Pki) -> None:
    """Without a token, the subject of a verified client certificate names
    the tenant (cert_subjects); a subject no tenant lists is UNAUTHENTICATED."""
    import squire

    def mtls(subject: str) -> SecurityConfig:
        text = TENANTS.replace(
            "[tenants.beta]", f'cert_subjects = ["{subject}"]\n\n[tenants.beta]', 1)
        return SecurityConfig(
            tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca), require_worker_client_cert=True,
            worker_tokens=(WORKER,), tenants=parse_tenants(text, "tenants.toml"))

    tls = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    async with orchestrator(security=mtls("CN=squire-worker")) as orch:
        async with squire.AsyncClient(target(orch), **tls, token=BETA) as beta, \
                squire.AsyncClient(target(orch), **tls, token=ALPHA) as alpha, \
                squire.AsyncClient(target(orch), **tls) as by_cert:
            theirs = await beta.lease_channel()
            mine = await alpha.lease_channel()
            # The certificate names alpha: it sees alpha's channel, not beta's.
            status = await by_cert.status()
            seen = {c["channel_id"] for c in status["channels"] if not c.get("directive")}
            assert seen == {mine.channel_id}
            cert_leased = await by_cert.lease_channel()
            assert orch.router.channels[cert_leased.channel_id].tenant == "alpha"
            for handle in (theirs, mine, cert_leased):
                await handle.release()
    async with orchestrator(security=mtls("CN=somebody-else")) as orch:
        async with squire.AsyncClient(target(orch), **tls) as nobody:
            with pytest.raises(squire.AccessDenied) as err:
                await nobody.status()
            assert "'CN=squire-worker' names no tenant" in str(err.value)
