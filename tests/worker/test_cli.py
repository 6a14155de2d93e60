"""``squire-worker``: flags and environment, and the real entry point as a process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pytest
from squire.api.v1 import squire_pb2 as pb

from squire_kernel.logs import JsonFormatter
from squire_kernel.serde import decode
from worker_service import ExecutorKind, LogFormat
from worker_service._cli import parse_config

from .fakes import FakeOrchestrator, task, until, wait_for

TESTS_DIR = Path(__file__).resolve().parent.parent
WORKER_BIN = Path(sys.executable).with_name("squire-worker")


def test_flags() -> None:
    cfg = parse_config(
        [
            "--ops", "a.b", "--ops", "c,d", "--orchestrator", "h:1", "--concurrency", "3",
            "--executor", "thread", "--prefetch", "0", "--worker-id", "w1",
            "--drain-grace", "2.5", "--abort-memory", "60", "--log-level", "debug",
            "--log-format", "json",
        ],
        environ={},
    )
    assert cfg.ops == ("a.b", "c", "d")
    assert (cfg.orchestrator, cfg.concurrency, cfg.executor) == ("h:1", 3, ExecutorKind.THREAD)
    assert (cfg.prefetch, cfg.window, cfg.worker_id) == (0, 3, "w1")
    assert (cfg.drain_grace, cfg.abort_memory) == (2.5, 60.0)
    assert (cfg.log_level, cfg.log_format) == ("DEBUG", LogFormat.JSON)


def test_defaults() -> None:
    cfg = parse_config(["--ops", "m"], environ={})
    assert cfg.orchestrator == "127.0.0.1:50051"
    assert cfg.concurrency == (os.cpu_count() or 1)
    assert cfg.executor is ExecutorKind.PROCESS
    assert cfg.effective_prefetch == cfg.concurrency
    assert cfg.worker_id.endswith(f"-{os.getpid()}")
    assert (cfg.drain_grace, cfg.abort_memory, cfg.log_level) == (30.0, 300.0, "INFO")


def test_environment_and_flags_win() -> None:
    environ = {
        "SQUIRE_OPS": "x, y", "SQUIRE_ORCHESTRATOR": "e:2", "SQUIRE_CONCURRENCY": "5",
        "SQUIRE_EXECUTOR": "inline", "SQUIRE_PREFETCH": "7", "SQUIRE_WORKER_ID": "env-w",
        "SQUIRE_DRAIN_GRACE": "1", "SQUIRE_ABORT_MEMORY": "2", "SQUIRE_LOG_LEVEL": "warning",
        "SQUIRE_LOG_FORMAT": "json",
    }
    cfg = parse_config([], environ=environ)
    assert cfg.ops == ("x", "y")
    assert (cfg.orchestrator, cfg.concurrency, cfg.executor) == ("e:2", 5, ExecutorKind.INLINE)
    assert (cfg.prefetch, cfg.worker_id, cfg.drain_grace, cfg.abort_memory) == (7, "env-w", 1, 2)
    assert (cfg.log_level, cfg.log_format) == ("WARNING", LogFormat.JSON)
    cfg = parse_config(["--ops", "z", "--concurrency", "1"], environ=environ)
    assert (cfg.ops, cfg.concurrency) == (("z",), 1)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        ([], {}),  # no ops
        (["--ops", "m", "--concurrency", "0"], {}),
        (["--ops", "m", "--executor", "gpu"], {}),
        (["--ops", "m"], {"SQUIRE_PREFETCH": "-1"}),
        (["--ops", "m", "--drain-grace", "nan"], {}),
    ],
)
def test_bad_input_exits_with_usage(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(argv, environ=environ)
    assert info.value.code == 2
    assert "squire-worker" in capsys.readouterr().err


async def start_worker(*args: str) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    return await asyncio.create_subprocess_exec(
        str(WORKER_BIN), *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def test_entry_point_serves_and_drains_on_sigterm(orchestrator: FakeOrchestrator) -> None:
    proc = await start_worker(
        "--ops", "worker.ops_for_tests", "--orchestrator", orchestrator.address,
        "--executor", "inline", "--concurrency", "1", "--worker-id", "cli-worker",
    )
    try:
        session = await orchestrator.session(timeout=15)
        assert session.hello.worker_id == "cli-worker"
        assert session.hello.capacity == 1
        session.send_tasks(task("add", 1, params={"n": 1}))
        await session.wait_results(1)
        assert decode(session.results[0].ok.output) == 2
        proc.send_signal(signal.SIGTERM)
        _, stderr = await until(proc.communicate(), timeout=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert b"SIGTERM: draining" in stderr
    await until(session.half_closed.wait())
    assert session.credits == [0]


async def test_entry_point_fails_on_a_bad_ops_module() -> None:
    proc = await start_worker("--ops", "no_such_module_here", "--executor", "inline")
    _, stderr = await until(proc.communicate(), timeout=15)
    assert proc.returncode == 2
    assert b"cannot load ops module 'no_such_module_here'" in stderr


async def test_entry_point_fails_when_rejected_logging_it_once(orchestrator: FakeOrchestrator) -> None:
    orchestrator.reject = __import__("grpc").StatusCode.ALREADY_EXISTS
    proc = await start_worker(
        "--ops", "worker.ops_for_tests", "--orchestrator", orchestrator.address,
        "--executor", "inline",
    )
    _, stderr = await until(proc.communicate(), timeout=15)
    assert proc.returncode == 3
    assert stderr.count(b"rejected this worker (ALREADY_EXISTS)") == 1, stderr.decode()


async def test_module_entry_point_with_process_executor(
    orchestrator: FakeOrchestrator, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR), SQUIRE_OPS="worker.ops_for_tests")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker_service", "--orchestrator", orchestrator.address,
        "--executor", "process", "--concurrency", "1", "--drain-grace", "0.2", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        session = await orchestrator.session(timeout=15)
        marker = tmp_path / "started"
        session.send_tasks(
            task("slow", {"marker": str(marker), "max": 30}, task_id=1),
            task("echo", "queued", task_id=2),
        )
        await wait_for(marker.exists, timeout=15, what="slow task running in a child")
        # SIGINT drains like SIGTERM: the queued task goes back at once, the
        # slow one at the deadline (when its abort signal is set, too).
        proc.send_signal(signal.SIGINT)
        _, stderr = await until(proc.communicate(), timeout=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    await until(session.half_closed.wait())
    kinds = {r.task_id: r.err.kind for r in session.results}
    assert kinds == {1: pb.ERROR_KIND_RETURNED, 2: pb.ERROR_KIND_RETURNED}, session.results


def test_json_log_format() -> None:
    record = logging.LogRecord("worker_service", logging.INFO, __file__, 1, "hi %s", ("x",), None)
    record.routing_key = "rk1"  # context passed with extra= travels as fields
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["message"]) == ("info", "worker_service", "hi x")
    assert entry["routing_key"] == "rk1"


def test_json_logs_carry_the_worker_id() -> None:
    import io

    from squire_kernel.logs import configure_logging as configure

    stream = io.StringIO()
    configure("INFO", "json", {"worker_id": "w-7"})
    root = logging.getLogger()
    root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
    try:
        logging.getLogger("worker_service").info("task failed", extra={"task_id": 3})
    finally:
        root.handlers[:] = []
    entry = json.loads(stream.getvalue())
    assert entry["worker_id"] == "w-7" and entry["task_id"] == 3
