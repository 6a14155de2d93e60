"""The orchestrator on a journal whose disk fills up (issue 15), in-process:
a real 1 MiB tmpfs. While commits fail, a new directive is refused with
RESOURCE_EXHAUSTED naming the reason (so are a new channel and tasks
published on one); the running one is not failed, and
what it had is committed once space is freed, so it completes."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._model import RouterConfig
from orchestrator_service._server import Orchestrator, OrchestratorConfig
from squire_kernel.serde import decode, encode

from .conftest import WireWorker, wait_for


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root only, as CI runs; see tests/store/conftest.py)."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a 1 MiB tmpfs: run it as root (CI does)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs on {mnt}: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass  # full at this size: try smaller writes
    finally:
        os.close(fd)


def plan(operation: str = "length") -> pb.DirectiveRequest:
    p = pb.Plan(serializer=pb.SERIALIZER_JSON)
    p.stages.add().map.operation = operation
    return pb.DirectiveRequest(plan=p)


async def test_a_full_disk_refuses_new_work_and_loses_nothing(small_fs: Path) -> None:
    journal = small_fs / "journal.db"
    config = OrchestratorConfig(port=0, grace=1.0, tick_interval=0.05, store=f"sqlite:///{journal}",
                                router=RouterConfig(no_worker_timeout=30.0, lease_timeout=600.0))
    async with Orchestrator(config) as orch:
        target = f"127.0.0.1:{orch.port}"
        worker = WireWorker(target, "w1")
        running = asyncio.create_task(worker.run())
        await wait_for(lambda: orch.router.workers)
        async with grpc.aio.insecure_channel(target) as channel:
            channels = pb_grpc.ChannelServiceStub(channel)
            leased = (await channels.LeaseChannel(pb.LeaseChannelRequest())).channel_id
        # Fill the filesystem to its last bytes, leaving the journal no room.
        filler = small_fs / "filler"
        await asyncio.to_thread(fill, filler)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            channels = pb_grpc.ChannelServiceStub(channel)
            strings = ["x" * 100 + str(i) for i in range(300)]
            first = stub.RunDirective(iter([
                plan(), pb.DirectiveRequest(inputs=pb.InputBatch(items=[encode(s) for s in strings]))
            ]))
            await wait_for(lambda: orch.store.failure is not None, timeout=20)
            assert orch.store.failure.code == "RESOURCE_EXHAUSTED"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.RunDirective(iter([plan()])):
                    pass
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "journal" in (err.value.details() or "") and "disk full" in (
                err.value.details() or "")
            # The same for a new channel, and for tasks on a leased one.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channels.LeaseChannel(pb.LeaseChannelRequest())
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            task = pb.TaskSpec(task_id=1, operation="length", input=encode("abc"),
                               serializer=pb.SERIALIZER_JSON)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channels.Publish(iter([pb.PublishRequest(channel_id=leased, tasks=[task])]))
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "publishing is refused" in (err.value.details() or "")
            os.unlink(filler)  # space again: the held commits go through
            values = {}
            async for event in first:
                if event.WhichOneof("kind") == "items":
                    for item in event.items.items:
                        values[item.index] = decode(item.value)
            assert values == {i: len(s) for i, s in enumerate(strings)}
            assert orch.store.failure is None
            published = await channels.Publish(
                iter([pb.PublishRequest(channel_id=leased, tasks=[task])]))
            assert published.published == 1
        worker.stop()
        running.cancel()
