"""Render the figures the fault suite measured as a Markdown table.

    SQUIRE_FAULT_FIGURES=/tmp/figures.jsonl python -m pytest tests/faults   # once or more
    python tests/faults/figures.py /tmp/figures.jsonl > tests/faults/FIGURES.md

Several runs appended to one file show as ranges (``min - max``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any


def render(rows: list[dict[str, Any]], runs: int) -> str:
    values: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in rows:
        values[(row["scenario"], row["figure"])].append(row["value"])
    lines = [
        "# Fault-injection suite: measured figures",
        "",
        f"From {runs} run(s) of `python -m pytest tests/faults` on 2 cores; "
        "ranges are min - max over the runs. Every scenario asserts lost = 0 and "
        "duplicated deliveries = 0 and checks the result values.",
        "",
        "| scenario | figure | value |",
        "|---|---|---|",
    ]
    last = ""
    # scenarios in issue order (numbered first), figures in measured order
    order = {key: n for n, key in enumerate(values)}
    for (scenario, figure), vals in sorted(
        values.items(), key=lambda kv: (not kv[0][0][0].isdigit(), kv[0][0], order[kv[0]])
    ):
        if figure == "seed":
            continue
        lines.append(f"| {scenario if scenario != last else ''} | {figure} | {_summary(vals)} |")
        last = scenario
    return "\n".join(lines) + "\n"


def _summary(vals: list[Any]) -> str:
    if all(isinstance(v, int | float) for v in vals):
        lo, hi = min(vals), max(vals)
        return f"{lo}" if lo == hi else f"{lo} - {hi}"
    unique = list(dict.fromkeys(str(v) for v in vals))
    return " / ".join(unique) if len(unique) <= 3 else f"{unique[0]} ... {unique[-1]}"


def main(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        counts[(r["scenario"], r["figure"])] += 1
    sys.stdout.write(render(rows, max(counts.values(), default=0)))


if __name__ == "__main__":
    main(sys.argv[1])
