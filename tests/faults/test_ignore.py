"""The Ignore strategy end to end.

An element whose operation raises ``FatalError(strategy=IGNORE)`` does not
fail the directive: a map reports its index as ``Skipped`` (with the error),
a fold lets it contribute ``empty()``. A fold whose every element is skipped
is ``empty()``. Nothing hangs and every other index arrives exactly once.
"""

from __future__ import annotations

from pathlib import Path

import squire
from procs import cluster

from .support import Figures, Ledger, consume, is_skipped, start_workers

N = 500
SKIP = [0, 3, 10, 11, 250, 499]


def test_ignored_elements_are_skipped_in_map_and_empty_in_fold(
    ledger: Ledger, env: dict[str, str], logs: Path, figures: Figures
) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        with squire.Client(c.target) as client:
            source = squire.IndexedStream.from_iterable(range(N))

            mapped = consume(source.map("fault_ignore", tag="map", skip=SKIP).events(client),
                             ledger, "map")
            ledger.tally("map", N).assert_exactly_once()
            for i in range(N):
                value = mapped.values[i]
                if i in SKIP:
                    assert is_skipped(value) and value.index == i
                    assert "FatalError" in value.error and f"element {i} is not worth it" in value.error
                else:
                    assert value == i * i
            assert mapped.progress is not None and mapped.progress.skipped == len(SKIP)
            # run() gives the same, in input order
            listed = source.map("fault_ignore", tag="run", skip=SKIP).run(client)
            assert [is_skipped(v) for v in listed] == [i in SKIP for i in range(N)]

            folded = source.map("fault_ignore", tag="fold", skip=SKIP).fold("fault_sum")
            assert folded.run(client) == sum(i * i for i in range(N) if i not in SKIP)
            assert set(ledger.executions("fold").values()) == {1}  # each element ran once
            assert set(ledger.executions("fold")) == set(range(N))

            everything = squire.IndexedStream.from_iterable(range(20)).map(
                "fault_ignore", tag="all", skip=list(range(20))).fold("fault_sum")
            assert everything.run(client) == 0  # empty()
            nothing = squire.IndexedStream.from_iterable([]).map(
                "fault_ignore", tag="none", skip=[]).fold("fault_sum")
            assert nothing.run(client) == 0
    figures.add("Ignore strategy", "map", f"{len(SKIP)} of {N:,} indices reported Skipped")
    figures.add("Ignore strategy", "fold", "skipped elements contribute empty(); all skipped = empty()")
