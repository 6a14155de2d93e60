"""Tenants in the routing core, without the network (issue 17): weighted
fair share of the workers' slots, and the per-tenant quotas (running
directives; queued tasks, which hold input credit back instead of failing)."""

from __future__ import annotations

from collections import Counter

import pytest

from orchestrator_service._events import ChannelLeased, TenantsChanged
from orchestrator_service._model import (
    Code,
    MapStage,
    PlanSpec,
    RouterConfig,
    RouterError,
    TaskRecord,
    TenantShare,
)
from squire_kernel.serde import encode

from .sim import ChannelView, Sim, hello

CONFIG = RouterConfig(directive_window=400, fairness_quantum=4)


def plan(tenant: str) -> PlanSpec:
    return PlanSpec((MapStage("fib_at"),), tenant=tenant)


def share_of_work(weights: dict[str, int], *, steps: int = 60) -> dict[str, float]:
    """Tenants flood directives of equal tasks; the share of tasks each ran
    while all had tasks queued."""
    sim = Sim(CONFIG, seed=1)
    sim.handle(TenantsChanged({t: TenantShare(weight=w) for t, w in weights.items()}))
    for i in range(3):
        sim.connect(hello(f"w{i}", capacity=2, prefetch=2))
    for tenant in weights:
        for _ in range(2 if tenant == "a" else 1):  # "a" runs more directives: no matter
            d = sim.start(plan(tenant))
            sim.inputs(d, [encode(5)] * 400)
    for _ in range(steps):
        sim.step(limit=1)
    ran = Counter(sim.router.directives[t.routing_key].plan.tenant for _, t in sim.log)
    total = sum(ran.values())
    return {t: ran[t] / total for t in weights}


def test_two_tenants_of_equal_weight_share_the_workers_evenly() -> None:
    share = share_of_work({"a": 1, "b": 1})
    assert abs(share["b"] - 0.5) < 0.05, share


def test_shares_follow_the_weights() -> None:
    share = share_of_work({"a": 3, "b": 1})
    assert abs(share["a"] - 0.75) < 0.05, share
    share = share_of_work({"a": 1, "b": 1, "c": 2})
    assert abs(share["c"] - 0.5) < 0.05 and abs(share["a"] - 0.25) < 0.05, share


def test_one_tenant_alone_gets_every_slot() -> None:
    sim = Sim(CONFIG)
    sim.handle(TenantsChanged({"a": TenantShare(weight=1), "b": TenantShare(weight=9)}))
    sim.connect(hello("w1", capacity=2, prefetch=2))
    d = sim.start(plan("a"))
    sim.inputs(d, [encode(3)] * 20)
    sim.step()
    assert len(sim.log) == 4  # b's weight reserves nothing while b has no work


def test_max_directives_refuses_naming_the_tenant() -> None:
    sim = Sim(CONFIG)
    sim.handle(TenantsChanged({"a": TenantShare(max_directives=2)}))
    sim.start(plan("a"))
    sim.start(plan("a"))
    sim.start(plan("b"))  # another tenant's directives do not count
    with pytest.raises(RouterError) as refused:
        sim.start(plan("a"))
    assert refused.value.code is Code.RESOURCE_EXHAUSTED
    assert "tenant 'a'" in refused.value.message and "max_directives (2" in refused.value.message


def test_max_queued_tasks_holds_input_credit_back_until_the_queue_drains() -> None:
    sim = Sim(RouterConfig(directive_window=10))
    sim.handle(TenantsChanged({"a": TenantShare(max_queued_tasks=15)}))
    d = sim.start(plan("a"))
    d2 = sim.start(plan("a"))
    sim.inputs(d, [encode(1)] * 10)
    sim.inputs(d2, [encode(1)] * 10)  # 20 queued: over the quota
    d.credit = d2.credit = 0
    worker = sim.connect(hello("w1", capacity=1, prefetch=0))
    sim.step(limit=1)  # one completes: no credit while 19 wait (quota 15)
    assert d.credit + d2.credit == 0
    for _ in range(8):
        sim.step(limit=1)
    # Under 15 queued again: the credit earned meanwhile goes out.
    assert d.credit + d2.credit == 9, (d.credit, d2.credit)
    assert worker.id in sim.router.workers


def test_max_queued_tasks_makes_publishing_wait() -> None:
    sim = Sim(CONFIG)
    sim.handle(TenantsChanged({"a": TenantShare(max_queued_tasks=5)}))
    sim.channels["c1"] = ChannelView("c1")
    sim.handle(ChannelLeased("c1", "a"))
    sim.publish("c1", [TaskRecord("", i, "length", input=encode("x")) for i in range(5)])
    assert not sim.router.can_publish("c1")
    sim.connect(hello("w1", capacity=4, prefetch=0))
    sim.step()
    assert sim.router.can_publish("c1")


def test_a_higher_priority_directive_is_served_first_within_its_tenant() -> None:
    sim = Sim(CONFIG, seed=2)
    sim.handle(TenantsChanged({"a": TenantShare(weight=1), "b": TenantShare(weight=1)}))
    sim.connect(hello("w1", capacity=2, prefetch=2))
    low = sim.start(PlanSpec((MapStage("fib_at"),), tenant="a", priority=0))
    sim.inputs(low, [encode(3)] * 40)
    other = sim.start(plan("b"))
    sim.inputs(other, [encode(3)] * 40)
    sim.step(limit=1)
    high = sim.start(PlanSpec((MapStage("fib_at"),), tenant="a", priority=5))
    sim.inputs(high, [encode(3)] * 20)
    sim.log.clear()
    for _ in range(20):
        sim.step(limit=1)
    ran = Counter(t.routing_key for _, t in sim.log)
    # a's share goes to its high-priority directive (the low one runs only
    # what the worker had buffered); b keeps its half.
    assert ran[high.id] == 20 - ran[other.id] - ran[low.id] and ran[low.id] <= 2, ran
    assert abs(ran[other.id] - (ran[high.id] + ran[low.id])) <= 2, ran


def test_without_tenants_priorities_order_the_directives() -> None:
    sim = Sim(CONFIG)
    sim.connect(hello("w1", capacity=1, prefetch=1))
    low = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(low, [encode(3)] * 10)
    high = sim.start(PlanSpec((MapStage("fib_at"),), priority=1))
    sim.inputs(high, [encode(3)] * 10)
    sim.run(limit=1)
    order = [t.routing_key for _, t in sim.log]
    # After what was dispatched before the high one arrived, it runs to its end first.
    first_high = order.index(high.id)
    assert order[first_high:first_high + 10] == [high.id] * 10, order
