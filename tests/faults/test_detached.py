"""Detached directives with real processes (issue 15): submit and leave,
the orchestrator SIGKILLed while nobody is attached, restarted on its
journal; then any client reads the results by id, and the CLI lists,
streams and cancels them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import squire
from procs import cluster, entry_point, wait_until

from .support import Figures, Ledger, start_workers

N = 400


def cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([entry_point("squire"), *args, "--target", target],
                          capture_output=True, text=True, timeout=120)


def test_detached_directive_survives_a_kill_while_nobody_is_attached(
        ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        stream = squire.IndexedStream.from_iterable(range(N)).map(
            "fault_square", tag="detached", sleep=0.01)
        with squire.Client(c.target) as client:
            directive_id = stream.submit(client)
        # Nobody is attached; part of the work is done when the orchestrator dies.
        wait_until(lambda: len(ledger.executions("detached")) >= N // 4, 60,
                   message="a quarter of the tasks executed")
        c.kill_orchestrator()
        c.restart_orchestrator(wait=True)

        listed = cli(c.target, "directives", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["directive_id"]: r for r in map(json.loads, listed.stdout.splitlines())}
        assert rows[directive_id]["detached"] is True

        out = cli(c.target, "results", directive_id)
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        indexes = [line["index"] for line in lines]
        assert sorted(indexes) == list(range(N)), "each index exactly once"
        assert all(line["value"] == line["index"] ** 2 for line in lines)
        executions = ledger.executions("detached")
        assert set(executions) == set(range(N))
        # Read again by another client: the same results, in the same order.
        with squire.Client(c.target) as other:
            again = [i for e in other.attach(directive_id)
                     if isinstance(e, squire.ItemBatch) for i, _ in e.items]
        assert again == indexes
        figures.add("detached directive, orchestrator SIGKILL while detached",
                    "tasks executed again", sum(executions.values()) - N)


def test_cancel_a_detached_directive_by_id(ledger: Ledger, env: dict[str, str],
                                           logs: Path) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0"], concurrency=1)
        stream = squire.IndexedStream.from_iterable(range(1000)).map(
            "fault_square", tag="cancelled", sleep=0.05)
        with squire.Client(c.target) as client:
            directive_id = stream.submit(client)
        out = cli(c.target, "cancel", directive_id)
        assert out.returncode == 0 and directive_id in out.stdout, out.stderr
        wait_until(lambda: not c.status().directives, 10, message="the directive gone")
        missing = cli(c.target, "results", directive_id)
        assert missing.returncode == 1
        assert f"NOT_FOUND: no directive '{directive_id}'" in missing.stderr
        assert len(ledger.executions("cancelled")) < 1000
