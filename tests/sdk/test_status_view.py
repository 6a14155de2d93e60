"""``squire status``'s tables: what a waiting directive waits for stays readable."""

from __future__ import annotations

import io

from rich.console import Console
from squire._status_view import render_status

WAITING = ("waiting for a worker that offers operation 'fib_att' (fails after 30 s); "
           "did you mean 'fib_at'?")


def test_what_a_directive_waits_for_is_a_line_under_the_tables() -> None:
    status = {
        "state": "running", "workers": [], "queues": [{"operation": "fib_att", "depth": 3}],
        "channels": [], "directives": [
            {"directive_id": "dbf98e40a0493f48a2fd44cd6fa721db", "plan": "map(fib_att)",
             "age_seconds": 3.9, "progress": {"total": 3, "queued": 3, "waiting": WAITING}},
            {"directive_id": "0123456789abcdef0123456789abcdef", "plan": "map(fib_at)",
             "progress": {"total": 3, "completed": 1}},
        ],
    }
    out = io.StringIO()
    Console(file=out, width=80, no_color=True).print(render_status(status, target="t"))
    lines = out.getvalue().splitlines()
    # one line that says it all (wrapped at 80 columns, not a word per cell line)
    (first,) = [i for i, line in enumerate(lines) if line.startswith("dbf98e40: waiting")]
    assert " ".join(" ".join(lines[first:first + 2]).split()) == f"dbf98e40: {WAITING}"
    assert sum("dbf98e40" in line for line in lines) == 2  # its table row and its line
    assert not any("0123456789abcdef:" in line for line in lines)  # no line for one not waiting
