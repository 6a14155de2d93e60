"""Embedded mode and ``squire demo``, end to end: real orchestrator and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from squire import DirectiveFailed, IndexedStream, SquireError, async_embedded, embedded
from squire_examples.ops import fib_at

from .polling import wait_for


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_embedded_runs_directives_and_cleans_up() -> None:
    with embedded(workers=2, timeout=60) as cluster:
        pids = [cluster.orchestrator_pid, *cluster.worker_pids]
        assert cluster.target == f"127.0.0.1:{cluster.port}"
        status = cluster.client.status()
        assert sorted(w["worker_id"] for w in status["workers"]) == ["embedded-0", "embedded-1"]

        stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at")
        assert stream.run(cluster.client) == [1, 1, 2, 3, 5, 8, 13, 21, 34, 55]
        assert stream.map("multiply_by", factor=2).fold("sum").run(cluster.client) == 286
        assert not any(_gone(pid) for pid in pids)
    assert all(_gone(pid) for pid in pids)


async def test_async_embedded_with_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "services.log"
    async with async_embedded(workers=1, executor="thread", timeout=60, log=log) as cluster:
        pids = [cluster.orchestrator_pid, *cluster.worker_pids]
        stream = IndexedStream.from_iterable(["a", "bb", "ccc"]).map("length")
        assert await stream.run_async(cluster.client, serializer="msgpack") == [1, 2, 3]
        assert await stream.fold("sum").run_async(cluster.client) == 6
    assert all(_gone(pid) for pid in pids)
    assert "embedded-0" in log.read_text()  # both services log there


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_no_process_outlives_an_error(error: type[BaseException]) -> None:
    with pytest.raises(error), embedded(workers=1, timeout=60) as cluster:
        pids = [cluster.orchestrator_pid, *cluster.worker_pids]
        raise error("stop")
    assert all(_gone(pid) for pid in pids)


def test_a_worker_that_cannot_start_fails_fast() -> None:
    # quiet by default, so the error quotes the worker's own words
    with (
        pytest.raises(SquireError, match=r"(?s)exited with code 2.*no_such_module_for_squire"),
        embedded(workers=1, ops=("no_such_module_for_squire",), timeout=60),
    ):
        pass  # pragma: no cover - start-up fails


QUIET_SCRIPT = """
import sys
import squire
from squire import IndexedStream

log = sys.stderr if sys.argv[1:] == ["stderr"] else None
with squire.embedded(workers=1, executor="inline", log=log) as cluster:
    print(IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum").run(cluster.client))
"""


@pytest.mark.parametrize("log", ["default", "stderr"])
def test_embedded_is_quiet_unless_asked_for_logs(tmp_path: Path, log: str) -> None:
    script = tmp_path / "quiet.py"
    script.write_text(QUIET_SCRIPT)
    done = subprocess.run([sys.executable, str(script), log], capture_output=True, text=True,
                          timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "143\n"
    if log == "default":
        assert done.stderr == ""
    else:
        assert "orchestrator listening" in done.stderr and "embedded-0" in done.stderr


def test_the_cluster_survives_a_killed_worker() -> None:
    with embedded(workers=2, timeout=60) as cluster:
        os.kill(cluster.worker_pids[0], signal.SIGKILL)
        wait_for(
            lambda: len(cluster.client.status()["workers"]) == 1,
            timeout=30,
            what="the orchestrator to drop the killed worker",
        )
        stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
        assert stream.run(cluster.client) == 143


def _one_bad_element(n: int, bad: int) -> Iterator[object]:
    for i in range(n):
        yield "not a number" if i == bad else 1


def test_a_fatal_error_while_the_input_streams_is_directive_failed() -> None:
    with embedded(workers=1, executor="thread", timeout=60) as cluster:
        stream = IndexedStream.from_iterable(_one_bad_element(300_000, bad=10)).map("fib_at")
        with pytest.raises(DirectiveFailed, match=r"^Fatal operation error: .*TypeError"):
            stream.run(cluster.client)


async def test_a_fatal_error_while_the_input_streams_async() -> None:
    async with async_embedded(workers=1, executor="thread", timeout=60) as cluster:
        for _ in range(3):  # the status must survive the race with the input stream
            stream = IndexedStream.from_iterable(_one_bad_element(300_000, bad=10)).map("fib_at")
            with pytest.raises(DirectiveFailed, match=r"^Fatal operation error: .*TypeError"):
                await stream.run_async(cluster.client)


def test_squire_demo_prints_143() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "squire.cli", "demo", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "143"
    assert "map(fib_at) -> fold(sum)" in done.stderr  # the progress bar, on stderr


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_integers_of_any_size_stay_exact_through_map_and_fold(serializer: str) -> None:
    # 50,000 digits: far past Python's int-to-str limit (4,300 digits), which
    # neither the client, the worker nor the orchestrator may trip over.
    huge = 7 * 10**49_999 + 12345
    inputs = [huge, -huge + 1, huge * 3]
    with embedded(workers=1, executor="inline", timeout=60) as cluster:
        mapped = IndexedStream.from_iterable(inputs).map("multiply_by", factor=2)
        assert mapped.run(cluster.client, serializer=serializer) == [2 * x for x in inputs]
        assert mapped.fold("sum").run(cluster.client, serializer=serializer) == 2 * sum(inputs)
        # fib_at's results pass 4,300 digits from n = 20,555 on
        fibs = IndexedStream.from_iterable([20_000, 22_999]).map("fib_at")
        values = [fib_at(20_000), fib_at(22_999)]
        assert fibs.run(cluster.client, serializer=serializer) == values
        assert fibs.fold("sum").run(cluster.client, serializer=serializer) == sum(values)
