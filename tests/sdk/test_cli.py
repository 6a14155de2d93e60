"""``squire status`` against the fake orchestrator (``squire demo`` is in test_embedded)."""

from __future__ import annotations

import json

import pytest
from squire import cli
from squire.api.v1 import squire_pb2 as pb

from .fake_orchestrator import FakeServer
from .test_errors import _free_port

STATUS = pb.GetStatusResponse(
    state="running",
    version="0.1.0",
    workers=[
        pb.WorkerStatus(
            worker_id="worker-a",
            operations=["fib_at", "length"],
            monoids=["sum"],
            capacity=4,
            in_flight=2,
            completed=17,
            peer="ipv4:127.0.0.1:5555",
        )
    ],
    queues=[pb.QueueStatus(operation="fib_at", depth=12)],
    queue_depth=12,
    channels=[pb.ChannelStatus(channel_id="chan-9", published=20, completed=8, directive=True)],
    directives=[
        pb.DirectiveStatus(
            directive_id="chan-9",
            plan="map(fib_at) -> fold(sum)",
            progress=pb.Progress(completed=8, total=20, queued=12, leased=2),
            age_seconds=3.5,
        )
    ],
)


@pytest.fixture
def scripted(fake: FakeServer) -> FakeServer:
    fake.servicer.status = STATUS
    return fake


def test_status_json(scripted: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--target", scripted.target, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["queue_depth"] == 12
    assert status["workers"][0]["worker_id"] == "worker-a"
    assert status["directives"][0]["progress"]["total"] == 20


def test_status_tables(
    scripted: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SQUIRE_TARGET", scripted.target)  # no --target: the environment's
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    for expected in [
        "running", "worker-a", "fib_at, length, sum (monoid)", "ipv4:127.0.0.1:5555",
        "chan-9", "directive", "map(fib_at) -> fold(sum)", "8/20 (40%)", "3.5s",
    ]:  # fmt: skip
        assert expected in out, expected


def test_status_of_an_idle_orchestrator(
    fake: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--target", fake.target]) == 0
    out = capsys.readouterr().out
    assert "no worker connected" in out
    assert "no active directives" in out


def test_watch_refreshes_until_ctrl_c(
    scripted: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_pause", pause)
    assert (
        cli.main(["status", "--target", scripted.target, "--json", "--watch", "--interval", "0.5"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["state"] == "running" for line in lines)
    assert pauses == [0.5, 0.5, 0.5]

    pauses.clear()
    assert cli.main(["status", "--target", scripted.target, "--watch"]) == 0
    assert "worker-a" in capsys.readouterr().out


def test_an_unreachable_orchestrator_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--target", f"127.0.0.1:{_free_port()}"]) == 1
    assert capsys.readouterr().err.startswith("squire: ")


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
