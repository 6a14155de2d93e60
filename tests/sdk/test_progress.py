"""The live progress bar: driven by directive events, safe without a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from squire import Client, IndexedStream
from squire._model import DirectiveEvent, DirectiveStarted, FoldValue, ItemBatch, Plan, Progress
from squire._progress import ProgressBar

EVENTS: list[DirectiveEvent] = [
    DirectiveStarted("5e1f00d2c9a84c55"),
    Progress(received=10, completed=3, queued=5, leased=2),
    ItemBatch(((0, 1), (1, 1), (2, 2), (3, 3))),
    Progress(received=10, completed=8, skipped=2, retries=1, total=10, queued=0, leased=2),
    Progress(received=10, completed=10, skipped=2, retries=1, total=10, tasks_done=19),
]


def _plan(total: int | None) -> Plan:
    return IndexedStream.from_iterable(range(total or 0), total=total).map("fib_at").plan()


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_the_bar_renders_done_total_and_details(terminal: bool) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=160)
    assert console.is_terminal is terminal
    with ProgressBar(_plan(10), console=console) as bar:
        for event in EVENTS:
            bar.update(event)
    text = out.getvalue()
    assert "map(fib_at)" in text
    assert "5e1f00d2" in text
    assert "10/10" in text
    assert "skipped 2" in text and "retries 1" in text


def test_an_unknown_total_and_a_fold() -> None:
    out = io.StringIO()
    with ProgressBar(_plan(None), console=Console(file=out, width=160)) as bar:
        bar.update(Progress(received=4, completed=4))
        bar.update(FoldValue(143))
    assert "4/4" in out.getvalue()


def test_run_with_progress_when_stderr_is_not_a_terminal(
    client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = IndexedStream.from_iterable(range(1, 11)).map("fib_at").fold("sum")
    assert stream.run(client, progress=True) == 143
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr only
    assert "map(fib_at) -> fold(sum)" in captured.err
    assert "10/10" in captured.err


def test_results_gathered_by_the_run_move_the_bar() -> None:
    # IndexedStream.run gathers map results itself: the bar asks for their count.
    out = io.StringIO()
    gathered = 0
    with ProgressBar(
        _plan(10), console=Console(file=out, width=160), items_seen=lambda: gathered
    ) as bar:
        gathered = 7
        bar.update(Progress(received=10, completed=4))
    assert "7/10" in out.getvalue()


def test_run_a_map_with_progress(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    assert IndexedStream.from_iterable(range(1, 601)).map("multiply_by", factor=1).run(
        client, progress=True
    ) == list(range(1, 601))
    assert "600/600" in capsys.readouterr().err


WAITING = ("waiting for a worker that offers operation 'fib_att' (fails after 30 s); "
           "did you mean 'fib_at'?")


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_what_a_directive_waits_for_is_a_whole_line_at_once(terminal: bool) -> None:
    """Printed when the wait begins (a pipe shows the bar only at the end), in
    full on an 80-column terminal (where the bar's end is cut off), once."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=80)
    with ProgressBar(_plan(2), console=console) as bar:
        bar.update(DirectiveStarted("5e1f00d2c9a84c55"))
        for _ in range(3):
            bar.update(Progress(received=2, queued=2, waiting=WAITING))
        printed = out.getvalue()
        assert "map(fib_at): " + WAITING[:60] in " ".join(printed.split())
        assert "did you mean 'fib_at'?" in printed
        bar.update(Progress(received=2, completed=2, total=2))
    assert out.getvalue().count("did you mean") <= 1 + terminal  # the line, maybe the bar
