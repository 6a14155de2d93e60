"""High availability on a real Postgres (issue 16): two orchestrator
replicas on one database, workers and a client given both addresses.

One replica leads; the other answers health NOT_SERVING and refuses calls
with UNAVAILABLE naming the leader. SIGKILL the leader mid-map: the standby
takes the lease within its TTL, restores the journal and the map completes,
every value exactly once. SIGTERM the leader (a rolling upgrade): it gives
the lease up at once, the standby takes over, and no directive fails.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import squire
from pg import Postgres
from procs import Replica, entry_point, wait_until
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from .support import (
    OPS,
    Figures,
    Ledger,
    MapRun,
    assert_squares,
    consume,
    square_map,
    stream_channel,
)

TTL = 3.0  # the default --lease-ttl


def start_workers(addresses: str, env: dict[str, str], logs: Path,
                  n: int = 2) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        with open(logs / f"worker-{i}.log", "ab") as log:
            procs.append(subprocess.Popen(
                [entry_point("squire-worker"), "--orchestrator", addresses, "--ops", OPS,
                 "--concurrency", "2", "--executor", "thread", "--worker-id", f"w{i}",
                 "--metrics-port", "0"],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}))
    return procs


@pytest.fixture
def replicas(pg_url: str, env: dict[str, str], logs: Path):  # type: ignore[no-untyped-def]
    started: list[Replica] = []
    workers: list[subprocess.Popen[bytes]] = []
    try:
        a = Replica("orchestrator-a", pg_url, logs, ttl=TTL, env=env)
        started.append(a)
        wait_until(lambda: a.health() == "SERVING", 30, message="the first replica leading")
        b = Replica("orchestrator-b", pg_url, logs, ttl=TTL, env=env)
        started.append(b)
        wait_until(lambda: b.health() == "NOT_SERVING", 30, message="the second one standing by")
        workers = start_workers(f"{a.address},{b.address}", env, logs, n=3)
        yield a, b
    finally:
        for p in [*workers, *(r.proc for r in started)]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def leader_of(*replicas: Replica) -> Replica | None:
    serving = [r for r in replicas if r.health() == "SERVING"]
    return serving[0] if len(serving) == 1 else None


def run_in_thread(client: squire.Client, ledger: Ledger, tag: str, n: int,
                  sleep: float) -> tuple[threading.Thread, list[MapRun | BaseException]]:
    out: list[MapRun | BaseException] = []

    def call() -> None:
        try:
            out.append(consume(square_map(n, tag, sleep=sleep).events(client), ledger, tag))
        except BaseException as exc:  # raised in the test
            out.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


def finished(thread: threading.Thread, out: list[MapRun | BaseException]) -> MapRun:
    thread.join(timeout=120)
    assert not thread.is_alive(), "the directive did not finish"
    (run,) = out
    if isinstance(run, BaseException):
        raise run
    return run


def test_a_standby_refuses_naming_the_leader(replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    with grpc.insecure_channel(b.address) as channel:
        stub = pb_grpc.DirectiveServiceStub(channel)
        plan = pb.Plan(serializer=pb.SERIALIZER_JSON)
        plan.stages.add().map.operation = "fault_square"
        def refusal() -> str:
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.RunDirective(iter([pb.DirectiveRequest(plan=plan)]), timeout=5))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            return refused.value.details() or ""

        # Right after its start the standby may not have read the lease yet
        # ("no leader holds the lease right now"); then it names the leader.
        details = wait_until(lambda: "the leader is" in refusal() and refusal(), 10,
                             message="a refusal naming the leader")
        assert f"the leader is {a.address}" in details
        status = pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
        assert status.state == "standby"


def test_sigkill_of_the_leader_fails_over_and_loses_nothing(
    replicas: tuple[Replica, Replica], ledger: Ledger, figures: Figures
) -> None:
    a, b = replicas
    n, tag = 400, "failover"
    with squire.Client(f"{a.address},{b.address}") as client:
        thread, out = run_in_thread(client, ledger, tag, n, sleep=0.01)
        wait_until(lambda: ledger.delivered(tag) >= n // 4, 60, message="a quarter delivered")
        killed = time.monotonic()
        a.stop(signal.SIGKILL)
        wait_until(lambda: b.health() == "SERVING", 30, message="the standby taking over")
        took_over = time.monotonic() - killed
        run = finished(thread, out)
    assert_squares(run.values, n)
    tally = ledger.tally(tag, n)
    tally.assert_exactly_once()
    assert took_over < TTL + 5, f"takeover after {took_over:.2f} s"
    scenario = f"leader SIGKILL (TTL {TTL:g} s)"
    figures.add(scenario, "standby serving after", f"{took_over:.2f} s")
    figures.add(scenario, "lost / duplicated", "0 / 0")
    figures.add(scenario, "tasks executed again", tally.re_executions)


def test_leader_sigkill_rounds(
    replicas: tuple[Replica, Replica], ledger: Ledger, figures: Figures
) -> None:
    """Rounds of a 5,000-task map on 3 workers, the leader SIGKILLed at a
    random moment of each; the killed replica comes back as the standby."""
    rng = random.Random(int(os.environ.get("SQUIRE_FAULT_SEED", time.time_ns() % 1_000_000)))
    rounds = int(os.environ.get("SQUIRE_FAULT_ROUNDS", "5"))
    n = 5_000
    pair = list(replicas)
    takeovers: list[float] = []
    re_executed = 0
    with squire.Client(f"{pair[0].address},{pair[1].address}") as client:
        for round_no in range(rounds):
            tag = f"frounds{round_no}"
            leader = wait_until(lambda: leader_of(*pair), 30, message="one leader")
            standby = pair[1] if leader is pair[0] else pair[0]
            wait_until(lambda s=standby: s.health() == "NOT_SERVING", 30, message="a standby")
            thread, out = run_in_thread(client, ledger, tag, n, sleep=0.001)
            point = rng.randrange(n // 20, n * 9 // 10)
            wait_until(lambda t=tag, p=point: ledger.delivered(t) >= p, 120,
                       message="the kill point")
            killed = time.monotonic()
            leader.stop(signal.SIGKILL)
            wait_until(lambda s=standby: s.health() == "SERVING", 30, message="the takeover")
            takeovers.append(time.monotonic() - killed)
            leader.start()  # back as the standby
            run = finished(thread, out)
            assert_squares(run.values, n)
            tally = ledger.tally(tag, n)
            tally.assert_exactly_once()
            re_executed += tally.re_executions
    # A sanity bound only: the figure is what matters (a loaded machine is slower).
    assert max(takeovers) < TTL + 5, f"takeovers {takeovers}"
    scenario = f"leader SIGKILL at random moments, {rounds} rounds x {n:,} tasks, 3 workers"
    figures.add(scenario, f"standby serving after (TTL {TTL:g} s)",
                f"{min(takeovers):.2f}-{max(takeovers):.2f} s")
    figures.add(scenario, "lost / duplicated", "0 / 0")
    figures.add(scenario, "tasks executed again", re_executed)


def test_a_rolling_upgrade_fails_no_directive(
    replicas: tuple[Replica, Replica], ledger: Ledger, figures: Figures
) -> None:
    a, b = replicas
    n, tag = 300, "rolling"
    with squire.Client(f"{a.address},{b.address}") as client:
        thread, out = run_in_thread(client, ledger, tag, n, sleep=0.01)
        wait_until(lambda: ledger.delivered(tag) >= n // 4, 60, message="a quarter delivered")
        stopped = time.monotonic()
        assert a.stop(signal.SIGTERM) == 0  # it resigns the lease on its way out
        wait_until(lambda: b.health() == "SERVING", 30, message="the standby taking over")
        took_over = time.monotonic() - stopped
        a.start()  # the upgraded replica comes back, as the standby now
        wait_until(lambda: a.health() == "NOT_SERVING", 30, message="the old leader standing by")
        run = finished(thread, out)
    assert_squares(run.values, n)
    ledger.tally(tag, n).assert_exactly_once()
    assert took_over < TTL + 5, f"takeover after a resign took {took_over:.2f} s"
    figures.add("rolling upgrade (SIGTERM the leader)", "standby serving after",
                f"{took_over:.2f} s")
    figures.add("rolling upgrade (SIGTERM the leader)", "failed directives", 0)


def test_a_postgres_restart_mid_map_loses_nothing(
    replicas: tuple[Replica, Replica], postgres: Postgres, ledger: Ledger, figures: Figures
) -> None:
    """Postgres restarted (fast) while the leader runs a map: journal writes
    wait and then commit; whichever replica leads afterwards finishes it."""
    a, b = replicas
    n, tag = 1000, "pgrestart"
    with squire.Client(f"{a.address},{b.address}") as client:
        thread, out = run_in_thread(client, ledger, tag, n, sleep=0.01)
        wait_until(lambda: ledger.delivered(tag) >= n // 4, 60, message="a quarter delivered")
        restarted = time.monotonic()
        postgres.restart()
        run = finished(thread, out)
        seconds = time.monotonic() - restarted
    assert_squares(run.values, n)
    tally = ledger.tally(tag, n)
    tally.assert_exactly_once()
    leader = wait_until(lambda: leader_of(a, b), 30, message="one leader after the restart")
    figures.add("Postgres restarted mid-map", "map done after the restart", f"{seconds:.2f} s")
    figures.add("Postgres restarted mid-map", "leader afterwards",
                "the same" if leader is a else "the standby")
    figures.add("Postgres restarted mid-map", "lost / duplicated", "0 / 0")


def test_a_frozen_leader_wakes_up_deposed_and_changes_nothing(
    replicas: tuple[Replica, Replica], ledger: Ledger, figures: Figures
) -> None:
    """SIGSTOP the leader past its lease: the standby takes over. SIGCONT:
    the old leader learns it lost the lease, stops at once and exits 1; its
    late writes are fenced, and every value reaches the caller exactly once."""
    a, b = replicas
    n, tag = 600, "frozen"
    with squire.Client(f"{a.address},{b.address}") as client:
        thread, out = run_in_thread(client, ledger, tag, n, sleep=0.01)
        wait_until(lambda: ledger.delivered(tag) >= n // 4, 60, message="a quarter delivered")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: b.health() == "SERVING", 30, message="the standby taking over")
        finally:
            a.proc.send_signal(signal.SIGCONT)
        code = a.proc.wait(timeout=30)
        run = finished(thread, out)
    assert code == 1, f"the deposed leader exited {code}"
    assert_squares(run.values, n)
    ledger.tally(tag, n).assert_exactly_once()
    log = (a.logs / f"{a.name}.log").read_text()
    assert "lost the leader lease" in log
    figures.add("leader SIGSTOPped past its lease, then SIGCONT", "old leader", "exit 1 (deposed)")
    figures.add("leader SIGSTOPped past its lease, then SIGCONT", "lost / duplicated", "0 / 0")


def test_while_postgres_is_down_new_work_is_refused_then_served(
    replicas: tuple[Replica, Replica], postgres: Postgres
) -> None:
    """Postgres stopped: a new directive is refused with UNAVAILABLE naming
    the store (nothing is accepted that cannot be journaled); started again,
    the next one runs."""
    a, b = replicas
    with squire.Client(f"{a.address},{b.address}", reattach_timeout=0) as client:
        assert square_map(3, "pgdown0").run(client) == [0, 1, 4]
        postgres.stop()
        try:
            def refused() -> str:
                try:
                    square_map(3, "pgdown1").run(client)
                except squire.RpcError as exc:
                    return f"{exc.code}: {exc.message}"
                return ""

            message = wait_until(refused, 30, message="a refusal while Postgres is down")
            # the journal cannot commit, or (past the TTL) the leader stepped down
            assert message.startswith("UNAVAILABLE"), message
        finally:
            postgres.start()
        wait_until(lambda: leader_of(a, b), 60, message="a leader once Postgres is back")
        assert wait_until(lambda: _runs(client), 60, message="a directive served again")


def _runs(client: squire.Client) -> bool:
    try:
        return square_map(3, "pgdown2").run(client) == [0, 1, 4]
    except squire.RpcError:
        return False


def test_a_leased_channel_survives_a_failover_and_a_rolling_upgrade(
    replicas: tuple[Replica, Replica], ledger: Ledger, figures: Figures
) -> None:
    """The leased-channel API across both ways leadership moves: the leader
    SIGKILLed a third of the way in, the new one SIGTERMed at two thirds."""
    n, tag = 2_000, "fchannel"
    pair = list(replicas)
    moves: list[tuple[str, float]] = []

    def move(received: int) -> None:
        if len(moves) >= 2 or received < n * (len(moves) + 1) // 3:
            return
        leader = wait_until(lambda: leader_of(*pair), 30, message="one leader")
        standby = pair[1] if leader is pair[0] else pair[0]
        wait_until(lambda: standby.health() == "NOT_SERVING", 30, message="a standby")
        how = "SIGKILL" if not moves else "SIGTERM"
        began = time.monotonic()
        leader.stop(signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
        wait_until(lambda: standby.health() == "SERVING", 30, message="the takeover")
        moves.append((how, time.monotonic() - began))
        leader.start()  # back as the standby

    with squire.Client(f"{pair[0].address},{pair[1].address}") as client, \
            client.lease_channel() as channel:
        values = stream_channel(channel, ledger, tag, n, move)
        publisher = channel.sender._publisher
        assert publisher.published + publisher.duplicates == n
    assert values == {i: i * i for i in range(n)}
    tally = ledger.tally(tag, n)
    tally.assert_exactly_once()
    assert [how for how, _ in moves] == ["SIGKILL", "SIGTERM"]
    scenario = f"leased channel, {n:,} tasks, leader SIGKILLed then SIGTERMed"
    for how, took in moves:
        figures.add(scenario, f"standby serving after the {how}", f"{took:.2f} s")
    figures.add(scenario, "lost / duplicated results", "0 / 0")
    figures.add(scenario, "tasks executed again", tally.re_executions)
