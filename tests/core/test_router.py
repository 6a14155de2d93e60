"""The routing core as a state machine: no network, no processes.

Every test drives the core through ``Router.handle(events)`` (see ``sim``),
which also checks ``validate()`` after every event batch.
"""

from __future__ import annotations

import json

import pytest
from squire import FatalError, FatalStrategy

from orchestrator_service._events import AcceptingStopped, DrainRequested
from orchestrator_service._model import (
    COMBINE,
    IGNORE,
    Code,
    DirectiveState,
    ErrorInfo,
    ErrorKind,
    FoldStage,
    MapStage,
    PlanSpec,
    RouterConfig,
    RouterError,
    Stage,
    TaskRecord,
)
from squire_kernel.serde import Serializer, decode, encode

from .sim import Driver, Sim, err, execute, hello, ok


def plan(*stages: Stage, serializer: int = 1) -> PlanSpec:
    return PlanSpec(stages=stages, serializer=serializer)


def m(op: str, **params: object) -> MapStage:
    return MapStage(op, encode(params) if params else b"")


def f(monoid: str) -> FoldStage:
    return FoldStage(monoid)


def run_plan(sim: Sim, p: PlanSpec, items: list[object], *, chunk: int = 7) -> object:
    directive = sim.start(p)
    ser = Serializer.from_wire(p.serializer)
    for lo in range(0, len(items), chunk):
        sim.inputs(directive, [encode(x, ser) for x in items[lo : lo + chunk]])
        sim.step()
    sim.end_input(directive)
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
    s = Sim()
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
    directive = sim.start(plan(f("sum")))
    sim.end_input(directive)
    (task,) = [t for w in sim.workers.values() for t in w.outbox]
    assert task.kind == COMBINE and not task.operands
    sim.run()
    assert directive.fold_value == b"0"


def test_single_element_fold_dispatches_nothing(sim: Sim) -> None:
    directive = sim.start(plan(f("concat")))
    sim.inputs(directive, [b'"only"'])
    sim.end_input(directive)
    assert directive.state is DirectiveState.DONE
    assert directive.fold_value == b'"only"'
    assert sim.router.stats.dispatched == 0
    assert directive.id not in sim.router.channels  # released


def test_chain_streams_without_a_barrier(sim: Sim) -> None:
    directive = sim.start(plan(m("fib_at"), m("multiply_by", factor=3), f("sum")))
    sim.inputs(directive, [encode(i) for i in range(1, 21)])
    sim.end_input(directive)
    sim.step(limit=1)  # each worker runs one stage-0 task
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
    a = sim.start(plan(m("length")))
    b = sim.start(plan(m("fib_at")))
    sim.inputs(a, [encode("x" * i) for i in range(50)])
    sim.inputs(b, [encode(i) for i in range(50)])
    sim.end_input(a)
    sim.end_input(b)
    sim.run()
    assert sorted(decode(o.value) for o in a.take_items().outcomes()) == list(range(50))
    fib = {o.index: decode(o.value) for o in b.take_items().outcomes()}
    assert fib[10] == 55 and len(fib) == 50


def test_concurrent_directives_share_workers_fairly() -> None:
    s = Sim(RouterConfig(fairness_quantum=4))
    ds = [s.start(plan(m("length"))) for _ in range(3)]
    for d in ds:
        s.inputs(d, [encode("x")] * 100)
    s.connect(hello("w1", capacity=4, prefetch=0))
    for _ in range(6):
        s.step()
    first = [t.routing_key for _, t in s.log[:24]]
    assert {d.id: first.count(d.id) for d in ds} == {d.id: 8 for d in ds}


def test_directive_ids_are_the_caller_s_and_unique(sim: Sim) -> None:
    from orchestrator_service._events import DirectiveSubmitted

    d = sim.start(plan(m("length")))
    with pytest.raises(RouterError) as dup:
        sim.handle(DirectiveSubmitted(d.id, plan(m("length"))))
    assert dup.value.code is Code.ALREADY_EXISTS


# ---------------------------------------------------------------- dispatch


def test_credit_window_is_never_exceeded() -> None:
    s = Sim()
    worker = s.connect(hello("w1", capacity=3, prefetch=2))
    d = s.start(plan(m("length")))
    s.inputs(d, [encode("ab")] * 200)
    s.end_input(d)
    assert len(worker.outbox) == 5
    s.run(limit=2)
    assert s.max_held["w1"] <= 5
    assert len(d.take_items().outcomes()) == 200


def test_a_task_goes_only_to_a_worker_offering_its_operation() -> None:
    s = Sim()
    s.connect(hello("lengths", operations=("length",), monoids=()))
    s.connect(hello("fibs", operations=("fib_at",), monoids=("sum",)))
    assert run_plan(s, plan(m("length")), ["a", "bb"]) == [1, 2]
    assert run_plan(s, plan(m("fib_at"), f("sum")), list(range(1, 11))) == 143
    for worker_id, task in s.log:
        assert task.operation in (("length",) if worker_id == "lengths" else ("fib_at", "sum"))


def test_tasks_for_an_unoffered_operation_fail_after_the_timeout() -> None:
    s = Driver(RouterConfig(no_worker_timeout=30))
    s.connect(hello("w1"))
    d = s.start(plan(m("nobody_has_this")))
    s.inputs(d, [b"1"])
    s.tick()
    s.clock.now += 29
    s.tick()
    assert d.state is DirectiveState.RUNNING
    s.clock.now += 2
    s.tick()
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and d.failure[0] is Code.FAILED_PRECONDITION
    assert "nobody_has_this" in d.failure[1]
    assert d.id not in s.router.channels


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
    s = Sim(execute_fn=raising("ignore"))
    s.connect(hello("w1"))
    d = s.start(plan(m("fib_at")))
    s.inputs(d, [encode(i) for i in range(5)])
    s.end_input(d)
    s.run()
    items = {o.index: o for o in d.take_items().outcomes()}
    assert items[3].skipped and "skip me" in items[3].error
    assert [decode(items[i].value) for i in (0, 1, 2, 4)] == [0, 1, 1, 3]
    assert run_plan(s, plan(m("fib_at"), f("sum")), list(range(5))) == 0 + 1 + 1 + 3
    assert s.router.stats.ignored == 2


def test_terminate_fails_the_directive_and_broadcasts_ipc() -> None:
    s = Sim(execute_fn=raising("terminate"))
    s.connect(hello("w1"))
    w2 = s.connect(hello("w2"))
    d = s.start(plan(m("fib_at")))
    other = s.start(plan(m("length")))
    s.inputs(d, [encode(i) for i in range(100)])
    s.inputs(other, [encode("abc")] * 100)
    s.end_input(other)
    for _ in range(5):
        s.step(limit=1)
        if d.end is not None:
            break
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and d.failure[0] is Code.ABORTED
    assert d.failure[1].startswith("Fatal operation error: This operation will always fail.")
    assert d.id not in s.router.channels
    assert sum(q.depth for q in s.router.queues.values()) == s.progress(other).queued
    assert [i.kind for i in w2.ipc] == ["execution_failed"] and w2.ipc[0].routing_key == d.id
    s.run()
    assert other.state is DirectiveState.DONE
    assert len(other.take_items().outcomes()) == 100


def test_undecodable_payload_is_invalid_argument() -> None:
    s = Sim(execute_fn=raising("payload"))
    s.connect(hello("w1"))
    d = s.start(plan(m("fib_at")))
    s.inputs(d, [encode(i) for i in range(5)])
    s.run()
    assert d.failure is not None and d.failure[0] is Code.INVALID_ARGUMENT
    assert "input" in d.failure[1] and "element 3" in d.failure[1]


def test_plan_validation() -> None:
    s = Driver()
    s.connect(hello("w1"))
    cases = [
        (plan(), "no stages"),
        (plan(f("sum"), m("length")), "must be the last"),
        (plan(m("length"), f("length")), "not a monoid"),
        (plan(m("fib_at"), m("sum")), r"'sum' is a monoid, not an operation; fold with it"),
        (plan(m("")), "names no operation"),
    ]
    for p, message in cases:
        with pytest.raises(RouterError, match=message) as info:
            s.start(p)
        assert info.value.code is Code.INVALID_ARGUMENT
    assert not s.router.directives and not s.router.channels


# ------------------------------------------------------- delivery, leases


def test_lost_worker_tasks_are_requeued_and_late_results_dropped() -> None:
    s = Sim(RouterConfig(lease_timeout=10))
    w1 = s.connect(hello("w1", capacity=2, prefetch=2))
    d = s.start(plan(m("length")))
    s.inputs(d, [encode("x" * i) for i in range(10)])
    s.end_input(d)
    stolen = list(w1.outbox)
    w1.outbox.clear()
    assert len(stolen) == 4
    w2 = s.connect(hello("w2"))
    s.heartbeat(w2)
    s.clock.now += 11
    s.heartbeat(w2)
    s.tick()
    assert w1.closed is not None and "re-queued" in w1.closed and w2.closed is None
    assert "w1" not in s.router.workers
    assert s.router.stats.requeued == 4
    s.run()
    # the silent worker's late results arrive: dropped, never delivered twice
    s.report(w1, [ok(t, b"99") for t in stolen])
    assert s.router.stats.duplicates == 4
    items = d.take_items().outcomes()
    assert sorted(o.index for o in items) == list(range(10))
    assert all(o.value != b"99" for o in items)


def test_results_with_a_stale_lease_are_dropped() -> None:
    s = Driver()
    w = s.connect(hello("w1"))
    ch = s.lease()
    s.publish(ch.id, [TaskRecord("", 7, "length", input=b'"ab"')])
    (task,) = w.outbox
    s.report(w, [(task.lease_id + 1, 7, b"2", None, 0, 0.0)])
    assert s.router.stats.duplicates == 1 and not ch.results
    s.report(w, [ok(task, b"2")])
    s.report(w, [ok(task, b"2")])
    assert len(ch.results) == 1 and s.router.stats.duplicates == 2
    # a result naming another task under this lease is not the lease's
    s.report(w, [(task.lease_id, 8, b"2", None, 0, 0.0)])
    assert s.router.stats.duplicates == 3


def test_a_result_batch_may_mix_outcomes_and_keeps_execution_seconds() -> None:
    s = Driver()
    w = s.connect(hello("w1", prefetch=8))
    ch = s.lease()
    s.publish(ch.id, [TaskRecord("", i, "length", input=b'"ab"') for i in range(3)])
    a, b, c = w.outbox
    failed = ErrorInfo("ValueError", "no", kind=ErrorKind.OPERATION)
    s.report(w, [ok(a, b"2", 0.25), err(b, failed), ok(c, b"2", 0.5)])
    by_id = {r.task.task_id: r for r in ch.results}
    assert by_id[0].execution_seconds == 0.25 and by_id[2].execution_seconds == 0.5
    assert by_id[1].error == failed and by_id[1].output == b""


def test_returned_tasks_go_back_to_the_front_without_an_attempt_penalty() -> None:
    s = Driver()
    w = s.connect(hello("w1", capacity=1, prefetch=0))
    ch = s.lease()
    s.publish(ch.id, [TaskRecord("", i, "length", input=b'"a"') for i in range(3)])
    (task,) = w.outbox
    w.outbox.clear()
    s.set_window(w, 0)
    returned = ErrorInfo("Returned", "draining", kind=ErrorKind.RETURNED)
    s.report(w, [err(task, returned)])
    assert not w.outbox and s.router.channels[ch.id].queued == 3
    w2 = s.connect(hello("w2", capacity=1, prefetch=0))
    assert [t.task_id for t in w2.outbox] == [0]
    assert s.router.stats.requeued == 0 and s.router.stats.returned == 1


def test_a_task_that_keeps_crashing_workers_is_poison() -> None:
    s = Driver(RouterConfig(poison_threshold=3))
    d = s.start(plan(m("length")))
    s.inputs(d, [b'"boom"'])
    for i in range(3):
        w = s.connect(hello(f"w{i}", capacity=1, prefetch=0))
        assert len(w.outbox) == 1
        s.disconnect(w)
    assert d.state is DirectiveState.FAILED
    assert d.failure is not None and "poison" in d.failure[1] and "3 times" in d.failure[1]


def test_crash_reports_count_towards_poison() -> None:
    s = Driver(RouterConfig(poison_threshold=2))
    w = s.connect(hello("w1", capacity=1, prefetch=0))
    d = s.start(plan(m("length")))
    s.inputs(d, [b'"boom"'])
    crashed = ErrorInfo("BrokenProcessPool", "child died", kind=ErrorKind.CRASHED)
    for _ in range(2):
        (t,) = w.outbox
        w.outbox.clear()
        s.report(w, [err(t, crashed)])
    assert d.state is DirectiveState.FAILED and d.failure is not None
    assert "poison" in d.failure[1]


# ----------------------------------------------------------------- channels


def test_channel_lifecycle_and_errors() -> None:
    s = Sim()
    s.connect(hello("w1"))
    ch = s.lease()
    s.publish(ch.id, [TaskRecord("", i, "length", input=encode("x" * i)) for i in range(5)])
    with pytest.raises(RouterError) as dup:
        s.publish(ch.id, [TaskRecord("", 7, "length", input=b'""')] * 2)
    assert dup.value.code is Code.INVALID_ARGUMENT and "twice" in dup.value.message
    # An id the channel has is left out (a publisher resending after a broken call).
    s.publish(ch.id, [TaskRecord("", 4, "length", input=b'"changed"')])
    assert s.router.channels[ch.id].published == 5
    s.run()
    s.close(ch.id)
    assert ch.ended  # every result was emitted: the stream ends after them
    results = s.take(ch, 100)
    assert sorted(decode(r.output) for r in results) == [0, 1, 2, 3, 4]
    assert s.router.channels[ch.id].unread == 0
    with pytest.raises(RouterError) as closed:
        s.publish(ch.id, [TaskRecord("", 9, "length", input=b'""')])
    assert closed.value.code is Code.FAILED_PRECONDITION
    with pytest.raises(RouterError) as missing:
        s.publish("nope", [])
    assert missing.value.code is Code.NOT_FOUND
    s.release(ch.id)
    assert ch.released and ch.id not in s.router.channels
    with pytest.raises(RouterError) as gone:
        s.release(ch.id)
    assert gone.value.code is Code.NOT_FOUND


def test_a_closed_channel_ends_once_its_last_result_is_emitted() -> None:
    s = Sim()
    s.connect(hello("w1"))
    ch = s.lease()
    s.publish(ch.id, [TaskRecord("", 1, "length", input=b'"abc"')])
    s.close(ch.id)
    assert not ch.ended
    s.run()
    assert ch.ended and not ch.released and len(ch.results) == 1


def test_publishing_is_bounded_per_channel() -> None:
    s = Driver(RouterConfig(max_queued_per_channel=10))
    ch = s.lease()
    assert s.router.can_publish(ch.id)
    s.publish(ch.id, [TaskRecord("", i, "length", input=b'""') for i in range(10)])
    assert not s.router.can_publish(ch.id)


def test_directive_input_window_bounds_memory() -> None:
    s = Sim(RouterConfig(directive_window=100))
    d = s.start(plan(m("length")))
    assert d.credit == 100
    s.inputs(d, [b'""'] * 100)
    assert d.credit == 100  # nothing completed: no more credit
    s.connect(hello("w1", capacity=4, prefetch=0))
    s.step()
    assert d.credit == 104  # four elements completed: four more may come


def test_cancel_drops_queued_tasks_and_aborts_workers(sim: Sim) -> None:
    d = sim.start(plan(m("length")))
    sim.inputs(d, [b'"x"'] * 500)
    sim.cancel(d)
    assert d.state is DirectiveState.CANCELLED
    assert d.id not in sim.router.channels
    assert sum(q.depth for q in sim.router.queues.values()) == 0
    assert all(any(i.kind == "abort" for i in w.ipc) for w in sim.workers.values())
    sim.run()  # the in-flight results come back late and are dropped
    assert sim.router.stats.late > 0 and not d.items
    sim.inputs(d, [b'"y"'])  # late inputs of an ended directive change nothing
    assert not sim.router.channels


def test_inputs_after_end_input_are_refused(sim: Sim) -> None:
    d = sim.start(plan(m("length")))
    sim.end_input(d)
    assert d.state is DirectiveState.DONE  # nothing came: an empty map is done
    d2 = sim.start(plan(m("length")))
    sim.inputs(d2, [b'"a"'])
    sim.end_input(d2)
    with pytest.raises(RouterError) as info:
        sim.inputs(d2, [b'"b"'])
    assert info.value.code is Code.INVALID_ARGUMENT


def test_shutdown_refuses_new_directives_and_drain_reaches_every_worker() -> None:
    s = Driver()
    w = s.connect(hello("w1"))
    s.handle(AcceptingStopped())
    with pytest.raises(RouterError) as info:
        s.start(plan(m("length")))
    assert info.value.code is Code.UNAVAILABLE
    with pytest.raises(RouterError):
        s.lease()
    s.handle(DrainRequested(5.0))
    assert [(i.kind, i.message) for i in w.ipc] == [("drain", "5")]


def test_worker_hello_validation() -> None:
    s = Driver(RouterConfig(max_workers=1))
    with pytest.raises(RouterError) as empty:
        s.connect(hello("w", operations=(), monoids=()))
    assert empty.value.code is Code.INVALID_ARGUMENT
    s.connect(hello("w"))
    with pytest.raises(RouterError) as dup:
        s.connect(hello("w"))
    assert dup.value.code is Code.ALREADY_EXISTS
    with pytest.raises(RouterError) as full:
        s.connect(hello("w2"))
    assert full.value.code is Code.RESOURCE_EXHAUSTED


def test_timeouts_are_retried_then_fatal() -> None:
    s = Driver(RouterConfig(max_timeouts=2))
    w = s.connect(hello("w1", capacity=1, prefetch=0))
    d = s.start(PlanSpec((m("length"),), task_timeout_seconds=0.5))
    s.inputs(d, [b'"slow"'])
    timeout = ErrorInfo("TaskTimeout", "ran longer than 0.5 s", kind=ErrorKind.TIMEOUT)
    (t,) = w.outbox
    assert t.timeout_seconds == 0.5
    w.outbox.clear()
    s.report(w, [err(t, timeout)])
    assert d.state is DirectiveState.RUNNING and s.router.stats.timeouts == 1
    (t,) = w.outbox
    assert t.attempt == 2
    w.outbox.clear()
    s.report(w, [err(t, timeout)])
    assert d.state is DirectiveState.FAILED and d.failure is not None
    assert "ran longer than 0.5 s" in d.failure[1]


def test_a_channel_task_that_times_out_too_often_is_delivered_once_as_its_error() -> None:
    s = Driver(RouterConfig(max_timeouts=2))
    w = s.connect(hello("w1", capacity=1, prefetch=0))
    c = s.lease()
    s.publish(c.id, [TaskRecord("", 1, "length", input=b'"slow"', timeout_seconds=0.5)])
    timeout = ErrorInfo("TaskTimeout", "ran longer than 0.5 s", kind=ErrorKind.TIMEOUT)
    for _ in range(2):
        (t,) = w.outbox
        w.outbox.clear()
        s.report(w, [err(t, timeout)])  # validate(): the leased count stays exact
    (result,) = s.take(c, 10)
    assert result.error is not None and result.error.kind is ErrorKind.TIMEOUT
    assert s.router.channels[c.id].leased == 0


def test_successes_with_a_stale_lease_or_a_released_channel_are_dropped() -> None:
    s = Driver()
    w = s.connect(hello("w1"))
    d = s.start(plan(m("length")))
    s.inputs(d, [b'"ab"', b'"abc"'])
    first, second = w.outbox
    s.report(w, [(first.lease_id, first.task_id + 1, b"2", None, 0, 0.0)])
    assert s.router.stats.duplicates == 1 and not d.items
    s.report(w, [ok(first, b"2")] * 2)
    assert s.router.stats.duplicates == 2 and len(d.items) == 1
    s.cancel(d)
    s.report(w, [ok(second, b"3")])
    assert s.router.stats.late == 1 and len(d.items) == 1


def test_a_chain_runs_stage_by_stage() -> None:
    s = Driver()
    w = s.connect(hello("w1", prefetch=100))
    d = s.start(plan(m("length"), m("multiply_by")))
    s.inputs(d, [b'"a"', b'"bb"'])
    s.end_input(d)
    stage0 = list(w.outbox)
    w.outbox.clear()
    s.report(w, [ok(t, b"%d" % (t.index + 1)) for t in stage0])
    assert not d.items and [t.stage for t in w.outbox] == [1, 1]
    stage1 = list(w.outbox)
    s.report(w, [ok(t, b"%d" % (10 * t.index)) for t in stage1])
    assert d.state is DirectiveState.DONE and d.end is not None
    assert d.end.progress.tasks_done == 4
    assert {o.index: o.value for o in d.take_items().outcomes()} == {0: b"0", 1: b"10"}


def test_latency_is_observed_once_per_task_however_results_are_batched() -> None:
    import asyncio

    from orchestrator_service._metrics import OrchestratorMetrics

    s = Driver()
    loop = asyncio.new_event_loop()  # the collector's; never run here
    loop.close()
    metrics = OrchestratorMetrics(s.router, loop)
    w = s.connect(hello("w1", prefetch=100))
    d = s.start(plan(m("length")))
    s.inputs(d, [b'"a"'] * 3)
    s.clock.now += 0.5
    s.inputs(d, [b'"b"'] * 2)  # published later: a second run
    other = s.start(plan(m("multiply_by")))
    s.inputs(other, [b"1"] * 4)
    s.clock.now += 0.5
    s.report(w, [ok(t, b"1") for t in w.outbox])
    metrics.tasks_done(s.completed, s.clock.now)
    length = metrics.task_latency.labels("length")
    assert sum(length.counts) == 5 and length.sum == pytest.approx(3 * 1.0 + 2 * 0.5)
    double = metrics.task_latency.labels("multiply_by")
    assert sum(double.counts) == 4 and double.sum == pytest.approx(4 * 0.5)


def test_a_directive_waiting_for_an_operation_says_so_and_suggests_a_close_name() -> None:
    s = Driver(RouterConfig(no_worker_timeout=30))
    s.connect(hello("w1"))  # offers fib_at, multiply_by, length
    d = s.start(plan(m("fib_att")))
    s.inputs(d, [b"1", b"2"])
    assert s.progress(d).waiting == ""  # not known to wait until a tick looked
    s.tick()
    waiting = s.progress(d).waiting
    assert "waiting for a worker that offers operation 'fib_att'" in waiting
    assert "fails after 30 s" in waiting and "did you mean 'fib_at'?" in waiting
    (logged,) = s.unserved  # said once, when the wait began
    assert logged.queue == "fib_att" and logged.message == waiting
    s.clock.now += 10
    s.tick()
    assert len(s.unserved) == 1
    s.clock.now += 21
    s.tick()
    assert d.failure is not None and d.failure[0] is Code.FAILED_PRECONDITION
    assert d.failure[1] == (
        "no connected worker offers operation 'fib_att' (waited 30 s); did you mean 'fib_at'?"
    )


def test_no_suggestion_for_a_name_some_worker_offered_or_nothing_close() -> None:
    s = Driver(RouterConfig(no_worker_timeout=5))
    gone = s.connect(hello("w1", operations=("fib_at", "rare_op")))
    s.disconnect(gone)  # rare_op was offered once: the name is right, the worker is gone
    s.connect(hello("w2", operations=("fib_at",)))
    rare = s.start(plan(m("rare_op")))
    far = s.start(plan(m("zzz")))
    s.inputs(rare, [b"1"])
    s.inputs(far, [b"1"])
    s.tick()
    assert "did you mean" not in s.progress(rare).waiting
    assert "did you mean" not in s.progress(far).waiting
    assert "'rare_op'" in s.progress(rare).waiting
    s.connect(hello("w3", operations=("rare_op",)))
    s.tick()
    assert s.progress(rare).waiting == ""
