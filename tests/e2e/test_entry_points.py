"""Tier 3: the real entry points as processes on 127.0.0.1 — the demo job
submitted to ``squire-orchestrator`` with two ``squire-worker`` s, the way the
README runs them by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import procs
import pytest
import squire
from squire import IndexedStream


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    with procs.cluster() as c:
        c.start_worker("w1", wait=False)
        c.start_worker("w2", wait=False)
        c.wait_for_workers({"w1", "w2"})
        yield c


def test_demo_job_against_entry_points(cluster) -> None:  # type: ignore[no-untyped-def]
    with squire.Client(cluster.target) as client:
        assert IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum").run(client) == 143
        lengths = IndexedStream.from_iterable(["hel", "lo", " world", "!"]).map("length")
        assert lengths.run(client) == [3, 2, 6, 1]
        chain = IndexedStream.from_iterable(range(1, 6)).map("multiply_by", factor=2)
        assert chain.fold("multiply").run(client) == 3840


def test_both_workers_took_tasks(cluster) -> None:  # type: ignore[no-untyped-def]
    with squire.Client(cluster.target) as client:
        IndexedStream.from_iterable(range(200)).map("fib_at").run(client)
        workers = {w["worker_id"]: w for w in client.status()["workers"]}
    assert set(workers) == {"w1", "w2"}
    assert all(int(w["completed"]) > 0 for w in workers.values())


def test_squire_status_json_matches_the_status_rpc(cluster) -> None:  # type: ignore[no-untyped-def]
    with squire.Client(cluster.target) as client:
        IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum").run(client)
        rpc = client.status()
    out = subprocess.run(
        [procs.entry_point("squire"), "status", "--target", cluster.target, "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    printed = json.loads(out.stdout)
    # connected_seconds moves between the two calls; everything else must agree
    for w in printed["workers"] + rpc["workers"]:
        w.pop("connected_seconds", None)
    assert printed == rpc


def test_squire_status_table(cluster) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [procs.entry_point("squire"), "status", "--target", cluster.target],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert "w1" in out.stdout and "w2" in out.stdout and "fib_at" in out.stdout


def test_squire_demo_prints_143() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "squire.cli", "demo", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "143"


def test_small_directives_share_one_session_stream(cluster) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    with squire.Client(cluster.target) as client:
        run = IndexedStream.from_iterable([1, 2, 3]).map("fib_at").events(client)
        assert type(run).__name__ == "SessionRun"
        assert [e for e in run if isinstance(e, squire.ItemBatch)]
        assert run.directive_id
        # many threads, one stream, every result its own
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(
                lambda n: IndexedStream.from_iterable(list(range(n))).map("fib_at").fold("sum")
                .run(client), range(40)))
        fib = [0, 1]
        while len(fib) < 45:
            fib.append(fib[-1] + fib[-2])
        assert got == [sum(fib[:n]) for n in range(40)]
        # a failing call ends only itself
        with pytest.raises(squire.DirectiveFailed, match="Fatal operation error"):
            IndexedStream.from_iterable([5]).map("length").run(client)
        with pytest.raises(squire.InvalidArgument, match="not a monoid"):
            IndexedStream.from_iterable([1, 2]).fold("length").run(client)
        assert IndexedStream.from_iterable([]).fold("sum").run(client) == 0
        assert IndexedStream.from_iterable(["ab"]).map("length").run(client) == [2]


def test_a_broken_session_fails_its_calls_instead_of_hanging() -> None:
    with procs.cluster() as c:
        c.start_worker("w1", executor="inline")
        client = squire.Client(c.target)
        assert IndexedStream.from_iterable([3]).map("fib_at").run(client) == [2]
        c.orchestrator.kill()
        c.orchestrator.wait()
        with pytest.raises(squire.RpcError):
            IndexedStream.from_iterable([3]).map("fib_at").run(client)
        client.close()


def test_every_waiting_session_call_fails_when_the_stream_breaks() -> None:
    """Leader/follower reading: whichever thread reads the stream when it
    breaks, every thread waiting for a call of that stream gets the error.
    (Without a journal: a journaled call would reattach and wait instead.)"""
    from concurrent.futures import ThreadPoolExecutor, wait

    with procs.cluster(orchestrator_args=("--store", "memory:")) as c:
        c.start_worker("w1", executor="inline")
        client = squire.Client(c.target)
        assert IndexedStream.from_iterable([3]).map("fib_at").run(client) == [2]
        with ThreadPoolExecutor(4) as pool:
            # nobody offers this operation: the calls wait in the queue
            futures = [pool.submit(IndexedStream.from_iterable([i]).map("nobody_offers").run,
                                   client) for i in range(4)]
            with squire.Client(c.target) as watcher:
                procs.wait_until(lambda: watcher.status_proto().queue_depth == 4,
                                 timeout=10, message="4 queued calls")
            c.orchestrator.kill()
            c.orchestrator.wait()
            done, pending = wait(futures, timeout=15)
            assert not pending, "a session call hung after the stream broke"
            for f in done:
                assert isinstance(f.exception(), squire.RpcError)
        client.close()


MY_OPS = '''
from squire import monoid, operation


@operation("shout")
def shout(s: str) -> str:
    return s.upper() + "!"


@monoid("join", empty="")
def join(a: str, b: str) -> str:
    return a + b
'''


@pytest.mark.parametrize(("ops", "executor"), [
    ("my_ops", "process"), ("./my_ops.py", "process"), ("my_ops.py", "thread"),
])
def test_worker_ops_from_the_current_folder(tmp_path, ops: str, executor: str) -> None:  # type: ignore[no-untyped-def]
    """The README's "Writing operations": ``squire-worker --ops my_ops`` run in
    the folder holding my_ops.py, no PYTHONPATH; a file path works too."""
    (tmp_path / "my_ops.py").write_text(MY_OPS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with procs.cluster(log_dir=tmp_path) as c, open(tmp_path / "worker-mine.log", "wb") as log:
        worker = subprocess.Popen(
            [procs.entry_point("squire-worker"), "--ops", ops, "--orchestrator", c.target,
             "--worker-id", "mine", "--executor", executor, "--concurrency", "2",
             "--metrics-port", "0"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            c.workers["mine"] = worker
            c.wait_for_workers({"mine"})
            with squire.Client(c.target) as client:
                words = IndexedStream.from_iterable(["a", "b", "c"]).map("shout")
                assert words.run(client) == ["A!", "B!", "C!"]
                assert words.fold("join").run(client) == "A!B!C!"
        finally:
            worker.terminate()
            worker.wait(timeout=30)


def test_worker_ops_file_that_does_not_exist(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = subprocess.run(
        [procs.entry_point("squire-worker"), "--ops", "./nope.py", "--metrics-port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "cannot load ops module './nope.py'" in out.stderr
    assert "Traceback" not in out.stderr


def test_squire_status_watch_redirected_prints_each_frame_as_it_comes(cluster) -> None:  # type: ignore[no-untyped-def]
    """Stdout a pipe, not a terminal: every refresh arrives while it runs, as
    plain lines (no cursor movement), not one frame at exit."""
    import signal

    proc = subprocess.Popen(
        [procs.entry_point("squire"), "status", "--target", cluster.target, "--watch",
         "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        frames = 0
        lines: list[str] = []
        while frames < 3:  # the third header means two whole frames came through
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, f"squire status ended early: {proc.stderr.read()}"  # type: ignore[union-attr]
            lines.append(line)
            frames += line.startswith("--- ")
        assert proc.poll() is None  # still watching: the frames were not held back
        text = "".join(lines)
        assert text.count("orchestrator " + cluster.target) >= 2 and "w1" in text
        assert "\x1b[" not in text  # no colours, no cursor movement
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_duplicate_worker_id_is_one_line_each_side_and_exit_3(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The second squire-worker --worker-id w1: one error line of its own, one
    warning in the orchestrator's log, and the documented exit code 3."""
    with procs.cluster(log_dir=tmp_path) as c:
        c.start_worker("w1", executor="inline")
        out = subprocess.run(
            [procs.entry_point("squire-worker"), "--orchestrator", c.target, "--ops",
             "squire_examples.ops", "--executor", "inline", "--worker-id", "w1",
             "--metrics-port", "0"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 3, out.stderr
        said = [line for line in out.stderr.splitlines() if "already connected" in line]
        assert len(said) == 1 and "ERROR" in said[0], out.stderr
        assert "Traceback" not in out.stderr
        procs.wait_until(lambda: "worker refused" in c.log("orchestrator"),
                         message="the orchestrator's warning")
        assert c.log("orchestrator").count("already connected") == 1, c.log("orchestrator")


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
def test_squire_results_writes_integers_of_any_size(serializer: str) -> None:
    """`squire results` of a detached map and fold over a 50,000-digit integer:
    exact JSON lines, not Python's 4,300-digit ValueError."""
    from squire_kernel.serde import decode

    huge = 7 * 10**49_999 + 12345
    with squire.embedded(workers=1, executor="inline") as cluster:
        mapped = IndexedStream.from_iterable([huge, 2]).map("multiply_by", factor=3)
        ids = [mapped.submit(cluster.client, serializer=serializer),
               mapped.fold("sum").submit(cluster.client, serializer=serializer)]
        outputs = []
        for directive_id in ids:
            out = subprocess.run(
                [procs.entry_point("squire"), "results", directive_id, "--target", cluster.target],
                capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr[-2000:]
            outputs.append([decode(line.encode()) for line in out.stdout.splitlines()])
    assert sorted(outputs[0], key=lambda row: row["index"]) == [
        {"index": 0, "value": 3 * huge}, {"index": 1, "value": 6}]
    assert outputs[1] == [{"fold": 3 * huge + 6}]
