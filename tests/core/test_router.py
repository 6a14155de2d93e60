"""The routing core as a state machine: no network, no processes."""

from __future__ import annotations

import json

import pytest
from squire import FatalError, FatalStrategy

from orchestrator_service._core import Router
from orchestrator_service._directive import DirectiveState
from orchestrator_service._model import (
    COMBINE,
    IGNORE,
    Code,
    ErrorInfo,
    ErrorKind,
    PlanSpec,
    ResultEvent,
    RouterConfig,
    RouterError,
    StageSpec,
    TaskRecord,
)
from squire_kernel.serde import Serializer, decode, encode

from .sim import Clock, Sim, execute, hello


def plan(*stages: StageSpec, serializer: int = 1) -> PlanSpec:
    return PlanSpec(stages=stages, serializer=serializer)


def m(op: str, **params: object) -> StageSpec:
    return StageSpec(op, encode(params) if params else b"")


def f(monoid: str) -> StageSpec:
    return StageSpec(monoid, fold=True)


def run_plan(sim: Sim, p: PlanSpec, items: list[object], *, chunk: int = 7) -> object:
    router = sim.router
    directive = router.start_directive(p)
    ser = Serializer.from_wire(p.serializer)
    for lo in range(0, len(items), chunk):
        router.directive_inputs(directive, [encode(x, ser) for x in items[lo : lo + chunk]])
        sim.step()
    router.directive_input_end(directive)
    sim.run()
    assert directive.state is DirectiveState.DONE, directive.failure
    if p.fold is not None:
        assert directive.fold_value is not None
        return decode(directive.fold_value, ser)
    out = directive.take_items().outcomes()
    assert sorted(o.index for o in out) == list(range(len(items)))
    return [decode(o.value, ser) for o in sorted(out, key=lambda o: o.index)]


@pytest.fixture
def sim() -> Sim:
    s = Sim(Router(RouterConfig(), clock=Clock()))
    s.connect(hello("w1"))
    s.connect(hello("w2"))
    return s


# ------------------------------------------------------------- directives


def test_map_keeps_indices(sim: Sim) -> None:
    assert run_plan(sim, plan(m("length")), ["hel", "lo", " world", "!"]) == [3, 2, 6, 1]


def test_map_then_fold_with_parameters(sim: Sim) -> None:
    p = plan(m("multiply_by", factor=2), f("multiply"))
    assert run_plan(sim, p, [1, 2, 3, 4, 5]) == 3840


def test_demo_job(sim: Sim) -> None:
    assert run_plan(sim, plan(m("fib_at"), f("sum")), list(range(1, 11))) == 143


def test_fold_keeps_order_for_non_commutative_concat(sim: Sim) -> None:
    words = [f"w{i}," for i in range(1000)]
    assert run_plan(sim, plan(f("concat")), words, chunk=50) == "".join(words)


def test_fold_msgpack(sim: Sim) -> None:
    p = plan(m("fib_at"), f("sum"), serializer=int(Serializer.MSGPACK))
    assert run_plan(sim, p, list(range(1, 11))) == 143


def test_empty_fold_asks_a_worker_for_empty(sim: Sim) -> None:
    directive = sim.router.start_directive(plan(f("sum")))
    sim.router.directive_input_end(directive)
    (task,) = [t for w in sim.router.workers.values() for t in w.outbox]
    assert task.kind == COMBINE and not task.operands
    sim.run()
    assert directive.fold_value == b"0"


def test_single_element_fold_dispatches_nothing(sim: Sim) -> None:
    directive = sim.router.start_directive(plan(f("concat")))
    sim.router.directive_inputs(directive, [b'"only"'])
    sim.router.directive_input_end(directive)
    assert directive.state is DirectiveState.DONE
    assert directive.fold_value == b'"only"'
    assert sim.router.stats.dispatched == 0
    assert directive.id not in sim.router.channels  # released


def test_chain_streams_without_a_barrier(sim: Sim) -> None:
    router = sim.router
    directive = router.start_directive(plan(m("fib_at"), m("multiply_by", factor=3), f("sum")))
    router.directive_inputs(directive, [encode(i) for i in range(1, 21)])
    router.directive_input_end(directive)
    sim.step(limit=1)  # each worker runs one stage-0 task
    stages = [t.stage for _, t in sim.log]
    sim.run(limit=1)
    stages = [t.stage for _, t in sim.log]
    first_stage1 = stages.index(1)
    last_stage0 = len(stages) - 1 - stages[::-1].index(0)
    assert first_stage1 < last_stage0, "stage two waited for stage one to finish"
    first_fold = stages.index(-1)
    assert first_fold < last_stage0, "the fold waited for the map to finish"
    assert decode(directive.fold_value or b"") == 3 * sum(
        json.loads(execute(TaskRecord("", 0, "fib_at", input=encode(i)))[0]) for i in range(1, 21)
    )


def test_two_directives_see_only_their_own_results(sim: Sim) -> None:
    router = sim.router
    a = router.start_directive(plan(m("length")))
    b = router.start_directive(plan(m("fib_at")))
    router.directive_inputs(a, [encode("x" * i) for i in range(50)])
    router.directive_inputs(b, [encode(i) for i in range(50)])
    router.directive_input_end(a)
    router.directive_input_end(b)
    sim.run()
    assert sorted(decode(o.value) for o in a.take_items().outcomes()) == list(range(50))
    fib = {o.index: decode(o.value) for o in b.take_items().outcomes()}
    assert fib[10] == 55 and len(fib) == 50


def test_concurrent_directives_share_workers_fairly() -> None:
    s = Sim(Router(RouterConfig(fairness_quantum=4), clock=Clock()))
    router = s.router
    ds = [router.start_directive(plan(m("length"))) for _ in range(3)]
    for d in ds:
        router.directive_inputs(d, [encode("x")] * 100)
    s.connect(hello("w1", capacity=4, prefetch=0))
    for _ in range(6):
        s.step()
    first = [t.routing_key for _, t in s.log[:24]]
    assert {d.id: first.count(d.id) for d in ds} == {d.id: 8 for d in ds}


# ---------------------------------------------------------------- dispatch


def test_credit_window_is_never_exceeded() -> None:
    s = Sim(Router(RouterConfig(), clock=Clock()))
    s.connect(hello("w1", capacity=3, prefetch=2))
    router = s.router
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [encode("ab")] * 200)
    router.directive_input_end(d)
    (worker,) = router.workers.values()
    assert len(worker.outbox) == 5
    s.run(limit=2)
    assert s.max_held["w1"] <= 5
    assert len(d.take_items().outcomes()) == 200


def test_a_task_goes_only_to_a_worker_offering_its_operation() -> None:
    s = Sim(Router(RouterConfig(), clock=Clock()))
    s.connect(hello("lengths", operations=("length",), monoids=()))
    s.connect(hello("fibs", operations=("fib_at",), monoids=("sum",)))
    assert run_plan(s, plan(m("length")), ["a", "bb"]) == [1, 2]
    assert run_plan(s, plan(m("fib_at"), f("sum")), list(range(1, 11))) == 143
    for worker_id, task in s.log:
        assert task.operation in (("length",) if worker_id == "lengths" else ("fib_at", "sum"))


def test_tasks_for_an_unoffered_operation_fail_after_the_timeout() -> None:
    clock = Clock()
    router = Router(RouterConfig(no_worker_timeout=30), clock=clock)
    router.connect_worker(hello("w1"))
    d = router.start_directive(plan(m("nobody_has_this")))
    router.directive_inputs(d, [b"1"])
    router.tick()
    clock.now += 29
    router.tick()
    assert d.state is DirectiveState.RUNNING
    clock.now += 2
    router.tick()
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and d.failure[0] is Code.FAILED_PRECONDITION
    assert "nobody_has_this" in d.failure[1]
    assert d.id not in router.channels


# ------------------------------------------------------------------ errors


def raising(kind: str):  # type: ignore[no-untyped-def]
    def run(task: TaskRecord) -> tuple[bytes, ErrorInfo | None]:
        if task.kind == 0 and decode(task.input) == 3:
            if kind == "ignore":
                exc = FatalError("skip me", FatalStrategy.IGNORE)
                return b"", ErrorInfo(type(exc).__name__, str(exc), strategy=IGNORE)
            if kind == "payload":
                return b"", ErrorInfo("PayloadError", "input is not valid JSON",
                                      kind=ErrorKind.BAD_PAYLOAD)
            return b"", ErrorInfo("FatalError", "This operation will always fail.")
        return execute(task)

    return run


def test_ignored_element_is_skipped_in_map_and_empty_in_fold() -> None:
    s = Sim(Router(RouterConfig(), clock=Clock()), execute_fn=raising("ignore"))
    s.connect(hello("w1"))
    router = s.router
    d = router.start_directive(plan(m("fib_at")))
    router.directive_inputs(d, [encode(i) for i in range(5)])
    router.directive_input_end(d)
    s.run()
    items = {o.index: o for o in d.take_items().outcomes()}
    assert items[3].skipped and "skip me" in items[3].error
    assert [decode(items[i].value) for i in (0, 1, 2, 4)] == [0, 1, 1, 3]
    assert run_plan(s, plan(m("fib_at"), f("sum")), list(range(5))) == 0 + 1 + 1 + 3


def test_terminate_fails_the_directive_and_broadcasts_ipc() -> None:
    s = Sim(Router(RouterConfig(), clock=Clock()), execute_fn=raising("terminate"))
    s.connect(hello("w1"))
    w2 = s.connect(hello("w2"))
    router = s.router
    d = router.start_directive(plan(m("fib_at")))
    other = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [encode(i) for i in range(100)])
    router.directive_inputs(other, [encode("abc")] * 100)
    router.directive_input_end(other)
    for _ in range(5):
        s.step(limit=1)
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and d.failure[0] is Code.ABORTED
    assert d.failure[1].startswith("Fatal operation error: This operation will always fail.")
    assert d.id not in router.channels
    assert sum(q.depth for q in router.queues.values()) == other.progress().queued
    # the IPC went to every worker (Sim clears it; check the counter and w2's inbox)
    assert router.stats.ipc_sent >= 2
    del w2
    s.run()
    assert other.state is DirectiveState.DONE
    assert len(other.take_items().outcomes()) == 100


def test_undecodable_payload_is_invalid_argument() -> None:
    s = Sim(Router(RouterConfig(), clock=Clock()), execute_fn=raising("payload"))
    s.connect(hello("w1"))
    d = s.router.start_directive(plan(m("fib_at")))
    s.router.directive_inputs(d, [encode(i) for i in range(5)])
    s.run()
    assert d.failure is not None and d.failure[0] is Code.INVALID_ARGUMENT
    assert "input" in d.failure[1] and "element 3" in d.failure[1]


def test_plan_validation() -> None:
    router = Router(RouterConfig(), clock=Clock())
    router.connect_worker(hello("w1"))
    cases = [
        (plan(), "no stages"),
        (plan(f("sum"), m("length")), "must be the last"),
        (plan(m("length"), f("length")), "not a monoid"),
        (plan(StageSpec("")), "names no operation"),
    ]
    for p, message in cases:
        with pytest.raises(RouterError, match=message) as info:
            router.start_directive(p)
        assert info.value.code is Code.INVALID_ARGUMENT


# ------------------------------------------------------- delivery, leases


def test_lost_worker_tasks_are_requeued_and_late_results_dropped() -> None:
    clock = Clock()
    router = Router(RouterConfig(lease_timeout=10), clock=clock)
    s = Sim(router)
    w1 = s.connect(hello("w1", capacity=2, prefetch=2))
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [encode("x" * i) for i in range(10)])
    router.directive_input_end(d)
    stolen = list(w1.outbox)
    w1.outbox.clear()
    assert len(stolen) == 4
    s.connect(hello("w2"))
    router.heartbeat(router.workers["w2"])
    clock.now += 11
    router.heartbeat(router.workers["w2"])
    lost = router.tick()
    assert [w.id for w in lost] == ["w1"] and w1.lost
    assert router.stats.requeued == 4
    s.run()
    # the silent worker's late results arrive: dropped, never delivered twice
    router.on_results(w1, [ResultEvent(t.task_id, t.lease_id, b"99") for t in stolen])
    assert router.stats.duplicates == 4
    items = d.take_items().outcomes()
    assert sorted(o.index for o in items) == list(range(10))
    assert all(o.value != b"99" for o in items)


def test_results_with_a_stale_lease_are_dropped() -> None:
    router = Router(RouterConfig(), clock=Clock())
    w = router.connect_worker(hello("w1"))
    ch = router.lease_channel()
    router.publish(ch.id, [TaskRecord("", 7, "length", input=b'"ab"')])
    (task,) = w.outbox
    router.on_results(w, [ResultEvent(7, task.lease_id + 1, b"2")])
    assert router.stats.duplicates == 1 and not ch.results
    router.on_results(w, [ResultEvent(7, task.lease_id, b"2")])
    router.on_results(w, [ResultEvent(7, task.lease_id, b"2")])
    assert len(ch.results) == 1 and router.stats.duplicates == 2


def test_returned_tasks_go_back_to_the_front_without_an_attempt_penalty() -> None:
    router = Router(RouterConfig(), clock=Clock())
    w = router.connect_worker(hello("w1", capacity=1, prefetch=0))
    ch = router.lease_channel()
    router.publish(ch.id, [TaskRecord("", i, "length", input=b'"a"') for i in range(3)])
    (task,) = w.outbox
    w.outbox.clear()
    router.set_window(w, 0)
    returned = ErrorInfo("Returned", "draining", kind=ErrorKind.RETURNED)
    router.on_results(w, [ResultEvent(task.task_id, task.lease_id, error=returned)])
    assert not w.outbox and ch.queued == 3
    w2 = router.connect_worker(hello("w2", capacity=1, prefetch=0))
    assert [t.task_id for t in w2.outbox] == [0]
    assert router.stats.requeued == 0 and router.stats.returned == 1


def test_a_task_that_keeps_crashing_workers_is_poison() -> None:
    router = Router(RouterConfig(poison_threshold=3), clock=Clock())
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'"boom"'])
    for i in range(3):
        w = router.connect_worker(hello(f"w{i}", capacity=1, prefetch=0))
        assert len(w.outbox) == 1
        router.disconnect_worker(w)
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and "poison" in d.failure[1] and "3 times" in d.failure[1]


def test_crash_reports_count_towards_poison() -> None:
    router = Router(RouterConfig(poison_threshold=2), clock=Clock())
    w = router.connect_worker(hello("w1", capacity=1, prefetch=0))
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'"boom"'])
    crashed = ErrorInfo("BrokenProcessPool", "child died", kind=ErrorKind.CRASHED)
    for _ in range(2):
        (t,) = w.outbox
        w.outbox.clear()
        router.on_results(w, [ResultEvent(t.task_id, t.lease_id, error=crashed)])
    assert d.state is DirectiveState.FAILED and d.failure is not None
    assert "poison" in d.failure[1]


# ----------------------------------------------------------------- channels


def test_channel_lifecycle_and_errors() -> None:
    router = Router(RouterConfig(), clock=Clock())
    s = Sim(router)
    s.connect(hello("w1"))
    ch = router.lease_channel()
    router.publish(ch.id, [TaskRecord("", i, "length", input=encode("x" * i)) for i in range(5)])
    with pytest.raises(RouterError) as dup:
        router.publish(ch.id, [TaskRecord("", 4, "length", input=b'""')])
    assert dup.value.code is Code.INVALID_ARGUMENT
    s.run()
    router.close_channel(ch.id)
    assert not ch.drained  # results not taken yet
    results = router.take_results(ch, 100)
    assert sorted(decode(r.output) for r in results) == [0, 1, 2, 3, 4]
    assert ch.drained
    with pytest.raises(RouterError) as closed:
        router.publish(ch.id, [TaskRecord("", 9, "length", input=b'""')])
    assert closed.value.code is Code.FAILED_PRECONDITION
    with pytest.raises(RouterError) as missing:
        router.publish("nope", [])
    assert missing.value.code is Code.NOT_FOUND
    router.release_channel(ch.id)


def test_publishing_is_bounded_per_channel() -> None:
    router = Router(RouterConfig(max_queued_per_channel=10), clock=Clock())
    ch = router.lease_channel()
    router.publish(ch.id, [TaskRecord("", i, "length", input=b'""') for i in range(10)])
    assert not router.can_publish(ch)


def test_directive_input_window_bounds_memory() -> None:
    router = Router(RouterConfig(directive_window=100), clock=Clock())
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'""'] * 100)
    assert not d.wants_input()


def test_cancel_drops_queued_tasks_and_aborts_workers(sim: Sim) -> None:
    router = sim.router
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'"x"'] * 500)
    router.cancel_directive(d)
    assert d.state is DirectiveState.CANCELLED
    assert d.id not in router.channels
    assert sum(q.depth for q in router.queues.values()) == 0
    assert all(any(i.kind == "abort" for i in w.ipc) for w in router.workers.values())
    sim.run()  # the in-flight results come back late and are dropped
    assert router.stats.late > 0 and not d.items


def test_shutdown_refuses_new_directives() -> None:
    router = Router(RouterConfig(), clock=Clock())
    router.accepting = False
    with pytest.raises(RouterError) as info:
        router.start_directive(plan(m("length")))
    assert info.value.code is Code.UNAVAILABLE


def test_worker_hello_validation() -> None:
    router = Router(RouterConfig(max_workers=1), clock=Clock())
    with pytest.raises(RouterError) as empty:
        router.connect_worker(hello("w", operations=(), monoids=()))
    assert empty.value.code is Code.INVALID_ARGUMENT
    router.connect_worker(hello("w"))
    with pytest.raises(RouterError) as dup:
        router.connect_worker(hello("w"))
    assert dup.value.code is Code.ALREADY_EXISTS
    with pytest.raises(RouterError) as full:
        router.connect_worker(hello("w2"))
    assert full.value.code is Code.RESOURCE_EXHAUSTED


def test_timeouts_are_retried_then_fatal() -> None:
    router = Router(RouterConfig(max_timeouts=2), clock=Clock())
    w = router.connect_worker(hello("w1", capacity=1, prefetch=0))
    d = router.start_directive(PlanSpec((m("length"),), task_timeout_seconds=0.5))
    router.directive_inputs(d, [b'"slow"'])
    timeout = ErrorInfo("TaskTimeout", "ran longer than 0.5 s", kind=ErrorKind.TIMEOUT)
    (t,) = w.outbox
    assert t.timeout_seconds == 0.5
    w.outbox.clear()
    router.on_results(w, [ResultEvent(t.task_id, t.lease_id, error=timeout)])
    assert d.state is DirectiveState.RUNNING and router.stats.timeouts == 1
    (t,) = w.outbox
    assert t.attempt == 2
    w.outbox.clear()
    router.on_results(w, [ResultEvent(t.task_id, t.lease_id, error=timeout)])
    assert d.state is DirectiveState.FAILED and d.failure is not None
    assert "ran longer than 0.5 s" in d.failure[1]


def test_plain_successes_with_a_stale_lease_or_a_released_channel_are_dropped() -> None:
    router = Router(RouterConfig(), clock=Clock())
    w = router.connect_worker(hello("w1"))
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'"ab"', b'"abc"'])
    first, second = w.outbox
    # the fast path (OkResult tuples) checks leases like the general one
    router.on_results(w, outputs=[(first.lease_id, first.task_id + 1, b"2")])
    assert router.stats.duplicates == 1 and not d.items
    router.on_results(w, outputs=[(first.lease_id, first.task_id, b"2")] * 2)
    assert router.stats.duplicates == 2 and len(d.items) == 1
    router.cancel_directive(d)
    router.on_results(w, outputs=[(second.lease_id, second.task_id, b"3")])
    assert router.stats.late == 1 and len(d.items) == 1


def test_a_chain_takes_the_fast_path_stage_by_stage() -> None:
    router = Router(RouterConfig(), clock=Clock())
    w = router.connect_worker(hello("w1", prefetch=100))
    d = router.start_directive(plan(m("length"), m("multiply_by")))
    router.directive_inputs(d, [b'"a"', b'"bb"'])
    router.directive_input_end(d)
    stage0 = list(w.outbox)
    w.outbox.clear()
    router.on_results(w, outputs=[(t.lease_id, t.task_id, b"%d" % (t.index + 1)) for t in stage0])
    assert not d.items and [t.stage for t in w.outbox] == [1, 1]
    stage1 = list(w.outbox)
    router.on_results(w, outputs=[(t.lease_id, t.task_id, b"%d" % (10 * t.index)) for t in stage1])
    assert d.state is DirectiveState.DONE and d.tasks_done == 4
    assert {o.index: o.value for o in d.take_items().outcomes()} == {0: b"0", 1: b"10"}


def test_latency_is_observed_once_per_task_however_results_are_batched() -> None:
    import asyncio

    from orchestrator_service._metrics import OrchestratorMetrics

    clock = Clock()
    router = Router(RouterConfig(), clock=clock)
    loop = asyncio.new_event_loop()  # the collector's; never run here
    loop.close()
    metrics = OrchestratorMetrics(router, loop)
    w = router.connect_worker(hello("w1", prefetch=100))
    d = router.start_directive(plan(m("length")))
    router.directive_inputs(d, [b'"a"'] * 3)
    clock.now += 0.5
    router.directive_inputs(d, [b'"b"'] * 2)  # published later: a second run
    other = router.start_directive(plan(m("multiply_by")))
    router.directive_inputs(other, [b"1"] * 4)
    clock.now += 0.5
    router.on_results(w, outputs=[(t.lease_id, t.task_id, b"1") for t in w.outbox])
    length = metrics.task_latency.labels("length")
    assert sum(length.counts) == 5 and length.sum == pytest.approx(3 * 1.0 + 2 * 0.5)
    double = metrics.task_latency.labels("multiply_by")
    assert sum(double.counts) == 4 and double.sum == pytest.approx(4 * 0.5)
