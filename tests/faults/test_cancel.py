"""Scenario 7: the client cancels a 10,000-task map halfway.

The first half of the elements is quick; from index 5,000 on every task runs
long and polls its abort signal. Once the first half is delivered and the
long tasks occupy every slot, the client cancels the call. The queued tasks
must leave the status within 2 s and the running ones observe abort.
"""

from __future__ import annotations

import time
from pathlib import Path

import squire
from procs import cluster, wait_until

from .support import Figures, Ledger, directive_gone, queue_depth, start_workers

N = 10_000
HALF = N // 2
SLOTS = 6  # 3 workers x concurrency 2


def test_cancel_a_map_halfway(ledger: Ledger, env: dict[str, str], logs: Path,
                              figures: Figures) -> None:
    with cluster(env=env, log_dir=logs) as c:
        ids = ["w0", "w1", "w2"]
        start_workers(c, ids, concurrency=2)
        stream = squire.IndexedStream.from_iterable(range(N)).map(
            "fault_cancellable", tag="cancel", slow_from=HALF, hold=30.0)
        with squire.Client(c.target) as client:
            run = stream.events(client)
            values: dict[int, int] = {}
            for event in run:
                if isinstance(event, squire.ItemBatch):
                    for index, value in event.items:
                        ledger.deliver("cancel", index)
                        values[index] = value
                    if len(values) >= HALF:
                        break
            assert run.directive_id is not None
            wait_until(lambda: len(ledger.markers("started-cancel-")) >= SLOTS, 20,
                       message="every slot running a long task")
            queued_before = queue_depth(c, "fault_cancellable")
            run.cancel()
            cancelled = time.monotonic()
            wait_until(lambda: directive_gone(c, run.directive_id)
                       and queue_depth(c, "fault_cancellable") == 0, 2.0,
                       message="the cancelled directive's tasks to leave the status")
            gone = time.monotonic() - cancelled

            started = ledger.markers("started-cancel-")
            wait_until(lambda: len(ledger.markers("abort-cancel-")) >= len(started), 5,
                       message="every running long task to observe abort")
            aborts = ledger.markers("abort-cancel-")
            latency = max(aborts.values()) - cancelled
            assert latency < 1.0, latency
            # workers are free again: all slots idle, nothing leased
            wait_until(lambda: all(w.in_flight == 0 for w in c.status().workers), 5,
                       message="the workers to report every task of the directive")
            status = c.status()
            assert status.queue_depth == 0 and not status.channels and not status.directives

        tally = ledger.tally("cancel", N)
        assert not tally.duplicated
        assert all(values[i] == i * i for i in range(HALF))
        assert set(tally.deliveries) == set(range(HALF))
        executed_after = sum(1 for i in tally.executions if i >= HALF) - len(started)
        assert executed_after == 0, "long tasks started after the cancel"
        # the same workers take new work at once
        with squire.Client(c.target) as client:
            assert squire.IndexedStream.from_iterable(range(100)).map(
                "fault_square", tag="next").run(client) == [i * i for i in range(100)]
    figures.add("7. cancel a map halfway", "tasks / delivered before cancel",
                f"{N:,} / {len(values):,}")
    figures.add("7. cancel a map halfway", "queued tasks dropped", queued_before)
    figures.add("7. cancel a map halfway", "status clean after cancel, ms", round(gone * 1000))
    figures.add("7. cancel a map halfway", "running tasks that observed abort", len(aborts))
    figures.add("7. cancel a map halfway", "slowest abort observed after cancel, ms",
                round(latency * 1000))
