"""Payload safety: only JSON and MessagePack are decoded. A pickle sent as a
task input is refused as a bad payload and nothing runs, whatever serializer
it claims; and a static check proves no service code unpickles anything."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgpack
import procs
import pytest
from squire import Registry
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._server import Orchestrator
from squire_kernel.serde import encode
from worker_service._runtime import WorkerRuntime

from . import record_ops
from .conftest import orchestrator, target, wait_for, worker_config

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator_service", "worker_service", "clients/python/squire")
JSON, MSGPACK = pb.SERIALIZER_JSON, pb.SERIALIZER_MSGPACK


def evil_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when (and only when) it is unpickled."""
    # Protocol 2, hand-assembled: GLOBAL os.mkdir, (str(marker),), REDUCE, STOP.
    return (b"\x80\x02cos\nmkdir\nX" + len(str(marker)).to_bytes(4, "little")
            + str(marker).encode() + b"\x85R.")


@pytest.fixture
def record_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "executions"
    monkeypatch.setenv("SQUIRE_TEST_RECORD_FILE", str(path))
    return path


def executions(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run_directive(orch: Orchestrator, serializer: int, items: list[bytes], params: bytes = b"",
                  ) -> tuple[grpc.StatusCode, str]:
    """RunDirective on the blocking stack (called in a thread): its final status."""
    plan = pb.Plan(serializer=serializer,  # type: ignore[arg-type]
                   stages=[pb.Stage(map=pb.MapStage(operation="record", params=params))])

    def requests() -> Iterator[pb.DirectiveRequest]:
        yield pb.DirectiveRequest(plan=plan)
        yield pb.DirectiveRequest(inputs=pb.InputBatch(items=items))

    with grpc.insecure_channel(target(orch)) as channel:
        try:
            for _ in pb_grpc.DirectiveServiceStub(channel).RunDirective(requests(), timeout=30):
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_a_pickle_task_input_is_refused_and_runs_nothing(
    tmp_path: Path, record_file: Path
) -> None:
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    registry = Registry()
    registry.add_module(record_ops)
    async with orchestrator() as orch:
        async with WorkerRuntime(worker_config(orch), registry=registry) as worker:
            await wait_for(lambda: worker.ready, message="the worker")
            # The operation works and records what it runs.
            assert await asyncio.to_thread(run_directive, orch, JSON, [encode(7)]) == (
                grpc.StatusCode.OK, "")
            assert executions(record_file) == ["7"]
            # A pickle as JSON or MessagePack input: a decode error, nothing runs.
            for serializer, name in ((JSON, "JSON"), (MSGPACK, "MSGPACK")):
                code, details = await asyncio.to_thread(run_directive, orch, serializer,
                                                        [payload])
                assert code is grpc.StatusCode.INVALID_ARGUMENT, details
                assert f"input is not valid {name}" in details
            # A serializer other than JSON (1) or MessagePack (2), e.g. "pickle":
            # refused before any task exists; so is a pickle as parameters.
            code, details = await asyncio.to_thread(run_directive, orch, 3, [payload])
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "serializer" in details
            code, details = await asyncio.to_thread(run_directive, orch, JSON, [encode(1)],
                                                    payload)
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "params" in details
            assert executions(record_file) == ["7"]
            assert not marker.exists()
            await status_ok_after(orch)


NOT_STRICT_JSON = [b"NaN", b"Infinity", b"-Infinity", b"[1, NaN]", "7".encode("utf-16"),
                   b"\xef\xbb\xbf7"]


async def test_json_inputs_are_decoded_strictly_and_refusals_name_the_index(
    record_file: Path,
) -> None:
    # What Python's json.loads would take but JSON is not: NaN and infinity
    # literals, UTF-16 text and a UTF-8 byte-order mark.
    registry = Registry()
    registry.add_module(record_ops)
    async with orchestrator() as orch:
        async with WorkerRuntime(worker_config(orch), registry=registry) as worker:
            await wait_for(lambda: worker.ready, message="the worker")
            for index, bad in enumerate(NOT_STRICT_JSON):
                items = [encode(i) for i in range(index)] + [bad]
                code, details = await asyncio.to_thread(run_directive, orch, JSON, items)
                assert code is grpc.StatusCode.INVALID_ARGUMENT, (bad, details)
                assert "input is not valid JSON" in details, details
                assert f"at element {index}]" in details, details
            assert all(json.loads(line) in range(len(NOT_STRICT_JSON))
                       for line in executions(record_file))
            await status_ok_after(orch)


async def status_ok_after(orch: Orchestrator) -> None:
    async with grpc.aio.insecure_channel(target(orch)) as channel:
        status = await pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest())
    assert status.state == "running" and len(status.workers) == 1


def test_a_pickle_through_the_channel_api_to_a_worker_process(
    tmp_path: Path, record_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real worker entry point, its process executor decoding in a child."""
    marker = tmp_path / "unpickled"
    payload = evil_pickle(marker)
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    monkeypatch.setenv("PYTHONPATH", path)
    with procs.cluster() as c:
        c.start_worker("w1", ops="security.record_ops")
        with grpc.insecure_channel(c.target) as channel:
            stub = pb_grpc.ChannelServiceStub(channel)
            cid = stub.LeaseChannel(pb.LeaseChannelRequest(), timeout=10).channel_id
            tasks = [pb.TaskSpec(task_id=0, operation="record", input=encode("ok")),
                     pb.TaskSpec(task_id=1, operation="record", input=payload),
                     pb.TaskSpec(task_id=2, operation="record", input=payload,
                                 serializer=MSGPACK)]
            stub.Publish(iter([pb.PublishRequest(channel_id=cid, tasks=tasks)]), timeout=10)
            stub.CloseChannel(pb.CloseChannelRequest(channel_id=cid), timeout=10)
            results = {r.task_id: r for batch in stub.Subscribe(
                pb.SubscribeRequest(channel_id=cid), timeout=30) for r in batch.results}
            assert results[0].WhichOneof("outcome") == "ok"
            for task_id in (1, 2):
                assert results[task_id].err.kind == pb.ERROR_KIND_BAD_PAYLOAD
                assert "not valid" in results[task_id].err.message
            # A serializer value that is neither JSON nor MessagePack never gets queued.
            with pytest.raises(grpc.RpcError) as info:
                stub.Publish(iter([pb.PublishRequest(channel_id=cid, tasks=[pb.TaskSpec(
                    task_id=3, operation="record", input=payload,
                    serializer=3)])]), timeout=10)  # type: ignore[arg-type]
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "serializer" in (info.value.details() or "")
            stub.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=cid), timeout=10)
    assert executions(record_file) == ['"ok"']
    assert not marker.exists()


def test_the_evil_pickle_is_live(tmp_path: Path) -> None:
    """Guard against a vacuous test: the payload really acts when unpickled,
    and is not accidentally valid JSON or MessagePack."""
    marker = tmp_path / "unpickled"
    code = "import pickle, sys; pickle.loads(bytes.fromhex(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, evil_pickle(marker).hex()], check=True,
                   timeout=30)
    assert marker.is_dir()
    with pytest.raises(msgpack.ExtraData):
        msgpack.unpackb(evil_pickle(marker))


# ------------------------------------------------------------ static checks

def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), f"ruff is not installed next to {sys.executable}; pip install -e .[dev]"
    return subprocess.run([str(ruff), "check", "--no-cache", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_ruff_finds_no_unpickling_in_the_packages() -> None:
    result = _ruff("--select", "S301,S302", *PACKAGES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ruff_rule_catches_unpickling(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import marshal\nimport pickle\n\n\ndef f(b):\n"
                      "    return pickle.loads(b), marshal.loads(b)\n")
    result = _ruff("--select", "S301,S302", "--isolated", str(sample))
    assert result.returncode == 1
    assert "S301" in result.stdout and "S302" in result.stdout


def test_no_service_module_imports_a_pickle_library() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|marshal|shelve|jsonpickle)\b",
                         re.MULTILINE)
    offenders = [str(path.relative_to(REPO)) for package in PACKAGES
                 for path in (REPO / package).rglob("*.py") if pattern.search(path.read_text())]
    assert not offenders
