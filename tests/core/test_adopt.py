"""Adoption (``_adopt``): a reconnecting worker's held tasks leased back to
it, without the network.

A worker whose stream broke names in its next hello what it still runs (or
has the result of). The core leases each such task back to it under its old
lease id when it has the same computation pending -- queued, or leased to
another worker -- so the result counts and the task does not run again;
across a restart from the journal as well.
"""

from __future__ import annotations

import dataclasses

from orchestrator_service._adopt import digest
from orchestrator_service._events import ResultsArrived
from orchestrator_service._model import (
    DirectiveState,
    FoldStage,
    HeldTask,
    MapStage,
    PlanSpec,
    TaskRecord,
    WorkerHello,
)
from squire_kernel.serde import decode, encode

from .sim import Sim, execute, hello
from .test_restore import CONFIG, restart


def held(tasks: list[TaskRecord]) -> tuple[HeldTask, ...]:
    return tuple(HeldTask(t.routing_key, t.task_id, t.lease_id, digest(t)) for t in tasks)


def rejoin(base: WorkerHello, tasks: list[TaskRecord]) -> WorkerHello:
    return dataclasses.replace(base, held=held(tasks))


def results(tasks: list[TaskRecord]) -> list[tuple[int, int, bytes, None, int, float]]:
    return [(t.lease_id, t.task_id, execute(t)[0], None, 0, 0.01) for t in tasks]


def test_a_reconnecting_worker_gets_its_running_tasks_back() -> None:
    sim = Sim()
    h = hello("w1", capacity=2, prefetch=0)
    w1 = sim.connect(h)
    d = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(d, [encode(x) for x in range(10)])
    sim.end_input(d)
    # As the worker holds them: under the leases they were sent with.
    running = [dataclasses.replace(t) for t in w1.outbox]
    w1.outbox.clear()
    assert len(running) == 2
    sim.disconnect(w1)  # the stream broke; the worker runs on
    sim.connect(rejoin(h, running))
    assert sim.router.stats.adopted == 2
    assert not w1.outbox  # nothing new: its window is full of its own tasks
    sim.report(w1, results(running))  # under the old lease ids
    sim.run()
    assert d.state is DirectiveState.DONE
    assert sorted(d.items.indexes) == list(range(10))
    assert sim.router.stats.dispatched == 10  # no task ran twice
    assert sim.router.stats.duplicates == 0


def test_a_task_leased_to_another_worker_moves_to_its_holder() -> None:
    sim = Sim()
    h1 = hello("w1", capacity=1, prefetch=0)
    w1 = sim.connect(h1)
    d = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(d, [encode(7)])
    sim.end_input(d)
    (task,) = w1.outbox
    w1.outbox.clear()
    old = dataclasses.replace(task)  # as the worker holds it: the first lease
    sim.disconnect(w1)
    w2 = sim.connect(hello("w2", capacity=1, prefetch=0))
    (again,) = w2.outbox  # re-queued and leased to w2 meanwhile
    sim.connect(rejoin(h1, [old]))
    assert sim.router.stats.adopted == 1
    sim.report(w1, results([old]))
    assert d.state is DirectiveState.DONE and decode(d.items.values[0]) == 13
    sim.handle(ResultsArrived("w2", results([again])))  # w2's run: a duplicate
    assert sim.router.stats.duplicates == 1
    assert len(d.items.indexes) == 1


def test_another_computation_under_the_same_id_is_not_adopted() -> None:
    sim = Sim()
    h = hello("w1", capacity=1, prefetch=0)
    w1 = sim.connect(h)
    d = sim.start(PlanSpec((MapStage("fib_at"),)))
    sim.inputs(d, [encode(5)])
    (task,) = w1.outbox
    w1.outbox.clear()
    stranger = dataclasses.replace(task, input=encode(6))  # same id, other input
    sim.disconnect(w1)
    sim.connect(rejoin(h, [stranger]))
    assert sim.router.stats.adopted == 0
    (redone,) = w1.outbox  # dispatched again, under a new lease
    assert redone.lease_id != stranger.lease_id
    sim.report(w1, results([stranger]))  # the stranger's result changes nothing
    assert sim.router.stats.duplicates == 1 and not d.items.indexes


def test_a_restarted_core_adopts_the_results_of_the_last_epoch() -> None:
    sim = Sim(CONFIG)
    h = hello("w1", capacity=4, prefetch=0)
    w1 = sim.connect(h)
    plan = PlanSpec((MapStage("multiply_by", encode({"factor": 2})), FoldStage("sum")))
    d = sim.start(plan)
    sim.inputs(d, [encode(x) for x in range(12)])
    sim.end_input(d)
    sim.step(limit=2)  # two outcomes journaled, two tasks still at w1
    running = [dataclasses.replace(t) for t in sim.held["w1"]]
    assert len(running) == 2

    # The orchestrator died; w1 runs on. A new core restores the directive
    # and waits for its workers before it dispatches anything.
    new = restart(sim, dataclasses.replace(CONFIG, adoption_grace=3.0))
    new.held = {}
    new.log = []
    w2 = new.connect(hello("w2", capacity=4, prefetch=0))  # back first
    assert not w2.outbox
    new.connect(rejoin(h, running))
    assert new.router.stats.adopted == 2
    new.clock.now += 3.0
    new.tick()  # the grace is over: w2 (and w1) get the rest
    new.report(w1, results(running))
    new.run()
    view = new.directives[d.id]
    assert view.state is DirectiveState.DONE
    assert decode(view.fold_value) == sum(2 * x for x in range(12))
    assert all(t.task_id not in {r.task_id for r in running} for _, t in new.log)
    assert new.router.stats.duplicates == 0
    assert {w for w, _ in new.log} == {"w1", "w2"}
