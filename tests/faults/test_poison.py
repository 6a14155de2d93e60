"""Scenario 3: a poison operation that kills the process running it.

With the process executor only the pool child dies: the worker reports the
task CRASHED and lives on. With the thread executor the whole worker dies and
the orchestrator sees its stream break. Either way, once the task has killed
``--poison-threshold`` (3) processes the directive fails with a clear
"poison task" error, while a concurrent directive on the same workers
completes exactly once and the workers (or their replacements) keep serving.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import squire
from procs import Cluster, cluster, wait_until

from .support import (
    Figures,
    Ledger,
    MapRun,
    assert_squares,
    consume,
    square_map,
    start_workers,
)

THRESHOLD = 3
POISON = 57
OTHER_N = 3_000


def _concurrent(c: Cluster, ledger: Ledger, tag: str, n: int) -> tuple[threading.Thread, list[Any]]:
    """Run a healthy map in a thread; the list gets its MapRun or exception."""
    out: list[Any] = []

    def body() -> None:
        try:
            with squire.Client(c.target) as client:
                out.append(consume(square_map(n, tag, sleep=0.001).events(client), ledger, tag))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def _run_poison(c: Cluster, ledger: Ledger) -> tuple[squire.DirectiveFailed, float]:
    stream = squire.IndexedStream.from_iterable(range(200)).map(
        "fault_poison", tag="poison", poison=POISON)
    start = time.monotonic()
    with squire.Client(c.target) as client, pytest.raises(squire.DirectiveFailed) as failed:
        consume(stream.events(client), ledger, "poison")
    return failed.value, time.monotonic() - start


def _check_other(ledger: Ledger, thread: threading.Thread, out: list[Any]) -> None:
    thread.join(timeout=60)
    assert out, "the concurrent directive did not finish"
    assert isinstance(out[0], MapRun), f"the concurrent directive failed: {out[0]!r}"
    ledger.tally("other", OTHER_N).assert_exactly_once()
    assert_squares(out[0].values, OTHER_N)


def _assert_workers_exit_cleanly(c: Cluster, ids: list[str]) -> None:
    # After pool crashes, SIGTERM must still drain and end the worker with 0.
    for worker_id in ids:
        c.workers[worker_id].send_signal(signal.SIGTERM)
    for worker_id in ids:
        try:
            code = c.workers[worker_id].wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {worker_id} hangs on exit after pool crashes: "
                                 + c.log(f"worker-{worker_id}")) from None
        assert code == 0, c.log(f"worker-{worker_id}")


def test_poison_kills_pool_children(ledger: Ledger, env: dict[str, str], logs: Path,
                                    figures: Figures) -> None:
    args = ("--poison-threshold", str(THRESHOLD))
    with cluster(orchestrator_args=args, env=env, log_dir=logs) as c:
        ids = ["w0", "w1", "w2"]
        start_workers(c, ids, concurrency=2)
        thread, out = _concurrent(c, ledger, "other", OTHER_N)
        error, seconds = _run_poison(c, ledger)
        _check_other(ledger, thread, out)

        assert "poison task" in error.message
        assert f"killed its worker {THRESHOLD} times" in error.message
        # Charged once per crash it causes alone; a crash in a pool it shared
        # with other tasks is re-run alone first, hence at most twice as many.
        executions = ledger.executions("poison")[POISON]
        assert THRESHOLD <= executions <= 2 * THRESHOLD
        for worker_id in ids:
            assert c.workers[worker_id].poll() is None, f"worker {worker_id} died"
        assert {w.worker_id for w in c.status().workers} == set(ids)
        # the workers still serve
        with squire.Client(c.target) as client:
            again = consume(square_map(300, "again").events(client), ledger, "again")
        ledger.tally("again", 300).assert_exactly_once()
        assert_squares(again.values, 300)
        _assert_workers_exit_cleanly(c, ids)
    figures.add("3. poison (pool child dies)", "poison threshold", THRESHOLD)
    figures.add("3. poison (pool child dies)", "executions of the poison task", executions)
    figures.add("3. poison (pool child dies)", "directive failed after, s", round(seconds, 2))
    figures.add("3. poison (pool child dies)", "concurrent directive",
                f"{OTHER_N:,} tasks, lost 0, duplicated 0")


def test_poison_kills_whole_workers(ledger: Ledger, env: dict[str, str], logs: Path,
                                    figures: Figures) -> None:
    # Thread executor: os._exit in the operation ends the worker process.
    # Concurrency 1 and no prefetch: the dying worker holds only the poison.
    args = ("--poison-threshold", str(THRESHOLD))
    with cluster(orchestrator_args=args, env=env, log_dir=logs) as c:
        options = {"executor": "thread", "concurrency": 1, "extra": ("--prefetch", "0")}
        ids = ["w0", "w1", "w2", "w3"]
        start_workers(c, ids, **options)
        deaths: list[str] = []
        stop = threading.Event()

        def replace_dead() -> None:
            # What Kubernetes would do: restart a worker that died.
            serial = len(ids)
            while not stop.wait(0.05):
                for worker_id, proc in list(c.workers.items()):
                    if proc.poll() is not None and worker_id not in deaths:
                        deaths.append(worker_id)
                        c.start_worker(f"w{serial}", ops="faults.fault_ops", wait=False,
                                       **options)  # type: ignore[arg-type]
                        serial += 1

        replacer = threading.Thread(target=replace_dead, daemon=True)
        replacer.start()
        try:
            thread, out = _concurrent(c, ledger, "other", OTHER_N)
            error, seconds = _run_poison(c, ledger)
            _check_other(ledger, thread, out)
        finally:
            stop.set()
            replacer.join()
        assert "poison task" in error.message
        assert ledger.executions("poison")[POISON] == THRESHOLD
        # every death is a process exit the orchestrator saw before failing
        # the directive, so the exit codes are there to read now
        codes = {w: p.poll() for w, p in list(c.workers.items())}
        dead = sorted(w for w, code in codes.items() if code is not None)
        assert len(dead) == THRESHOLD, f"workers died: {codes}"
        assert all(codes[w] == 17 for w in dead)
    figures.add("3. poison (whole worker dies)", "workers killed by the poison task", len(dead))
    figures.add("3. poison (whole worker dies)", "directive failed after, s", round(seconds, 2))
    figures.add("3. poison (whole worker dies)", "concurrent directive",
                f"{OTHER_N:,} tasks, lost 0, duplicated 0")


def test_poison_does_not_take_a_task_sharing_its_pool_down(
    ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures
) -> None:
    # One worker, two slots: a long task of another directive runs next to
    # the poison every time it is retried. Only the poison may be blamed.
    args = ("--poison-threshold", str(THRESHOLD))
    with cluster(orchestrator_args=args, env=env, log_dir=logs) as c:
        start_workers(c, ["w0"], concurrency=2, extra=("--prefetch", "0"))
        stream = squire.IndexedStream.from_iterable([0]).map(
            "fault_cancellable", tag="innocent", slow_from=0, hold=1.0)
        out: list[Any] = []

        def innocent() -> None:
            try:
                with squire.Client(c.target) as client:
                    out.append(consume(stream.events(client), ledger, "innocent"))
            except BaseException as exc:
                out.append(exc)

        thread = threading.Thread(target=innocent, daemon=True)
        thread.start()
        wait_until(lambda: ledger.marker("started-innocent-0"), 20,
                   message="the innocent task running")
        error, _ = _run_poison_single(c, ledger)
        thread.join(timeout=30)
        assert "poison task" in error.message
        assert out and isinstance(out[0], MapRun), f"the innocent directive failed: {out!r}"
        assert out[0].values == {0: 0}
        ledger.tally("innocent", 1).assert_exactly_once()
    figures.add("3. poison (pool child dies)", "task sharing the pool with the poison",
                "completes (re-run alone, never blamed)")


def _run_poison_single(c: Cluster, ledger: Ledger) -> tuple[squire.DirectiveFailed, float]:
    stream = squire.IndexedStream.from_iterable([POISON]).map(
        "fault_poison", tag="poison1", poison=POISON)
    start = time.monotonic()
    with squire.Client(c.target) as client, pytest.raises(squire.DirectiveFailed) as failed:
        consume(stream.events(client), ledger, "poison1")
    return failed.value, time.monotonic() - start
