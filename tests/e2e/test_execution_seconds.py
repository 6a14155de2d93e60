"""``execution_seconds`` travels from the worker through the orchestrator to
the caller (it used to be dropped on the way and arrive as 0.0)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from procs import Cluster, cluster
from squire import Client


@pytest.fixture(scope="module")
def services() -> Iterator[Cluster]:
    with cluster() as c:
        c.start_worker("inline-1", executor="inline", concurrency=2)
        c.start_worker("process-1", executor="process", concurrency=2)
        yield c


def test_a_50_ms_task_reports_at_least_50_ms(services: Cluster) -> None:
    with Client(services.target) as client, client.lease_channel() as channel:
        ids = channel.sender.publish("sleep", [0.05] * 8)
        channel.sender.close()
        outcomes = {o.task_id: o for o in channel.receiver}
    assert sorted(outcomes) == sorted(ids)
    for outcome in outcomes.values():
        assert outcome.ok and outcome.value == 0.05
        assert 0.05 <= outcome.execution_seconds < 5.0, outcome


def test_a_fast_task_reports_a_small_positive_time(services: Cluster) -> None:
    with Client(services.target) as client, client.lease_channel() as channel:
        (task_id,) = channel.sender.publish("sleep", [0])
        channel.sender.close()
        (outcome,) = list(channel.receiver)
    assert outcome.task_id == task_id
    assert 0.0 < outcome.execution_seconds < 0.05
