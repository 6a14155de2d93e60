"""The orchestrator over the network (real grpc.aio server), without processes."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._server import Orchestrator
from squire_kernel.serde import encode

from .conftest import WireWorker, wait_for


def plan(*stages: tuple[str, str, dict[str, object]], serializer: int = 1) -> pb.Plan:
    p = pb.Plan(serializer=serializer)  # type: ignore[arg-type]
    for kind, op, params in stages:
        raw = json.dumps(params).encode() if params else b""
        if kind == "map":
            p.stages.append(pb.Stage(map=pb.MapStage(operation=op, params=raw)))
        else:
            p.stages.append(pb.Stage(fold=pb.FoldStage(monoid=op, params=raw)))
    return p


async def run(channel: grpc.aio.Channel, p: pb.Plan, items: list[bytes], batch: int = 3):  # type: ignore[no-untyped-def]
    async def requests():  # type: ignore[no-untyped-def]
        yield pb.DirectiveRequest(plan=p)
        for lo in range(0, len(items), batch):
            yield pb.DirectiveRequest(inputs=pb.InputBatch(items=items[lo : lo + batch]))

    events = []
    async for ev in pb_grpc.DirectiveServiceStub(channel).RunDirective(requests()):
        events.append(ev)
    return events


def items_of(events) -> dict[int, bytes]:  # type: ignore[no-untyped-def]
    return {i.index: i.value for e in events if e.HasField("items") for i in e.items.items}


def fold_of(events):  # type: ignore[no-untyped-def]
    (value,) = [e.fold.value for e in events if e.HasField("fold")]
    return json.loads(value)


async def test_map_fold_and_chain(channel, workers) -> None:  # type: ignore[no-untyped-def]
    events = await run(channel, plan(("map", "length", {})),
                       [encode(s) for s in ["hel", "lo", " world", "!"]])
    assert events[0].HasField("started")
    got = items_of(events)
    assert [json.loads(got[i]) for i in range(4)] == [3, 2, 6, 1]
    events = await run(channel, plan(("map", "multiply_by", {"factor": 2}), ("fold", "multiply", {})),
                       [encode(i) for i in range(1, 6)])
    assert fold_of(events) == 3840
    events = await run(channel, plan(("map", "fib_at", {}), ("fold", "sum", {})),
                       [encode(i) for i in range(1, 11)])
    assert fold_of(events) == 143
    last_progress = [e.progress for e in events if e.HasField("progress")][-1]
    assert last_progress.completed == 10 and last_progress.total == 10


async def test_msgpack_round_trip(channel, workers) -> None:  # type: ignore[no-untyped-def]
    import msgpack

    from squire_kernel.serde import Serializer
    items = [msgpack.packb(i) for i in range(1, 11)]
    events = await run(channel, plan(("map", "fib_at", {}), ("fold", "sum", {}),
                                     serializer=int(Serializer.MSGPACK)), items)
    (value,) = [e.fold.value for e in events if e.HasField("fold")]
    assert msgpack.unpackb(value) == 143


@pytest.mark.parametrize(
    ("p", "code", "text"),
    [
        (pb.Plan(), grpc.StatusCode.INVALID_ARGUMENT, "no stages"),
        (pb.Plan(stages=[pb.Stage(map=pb.MapStage(operation="length"))], serializer=7),
         grpc.StatusCode.INVALID_ARGUMENT, "serializer"),
        (plan(("fold", "length", {})), grpc.StatusCode.INVALID_ARGUMENT, "not a monoid"),
        (pb.Plan(stages=[pb.Stage(map=pb.MapStage(operation="multiply_by", params=b"{nope"))]),
         grpc.StatusCode.INVALID_ARGUMENT, "params"),
    ],
)
async def test_bad_plans_are_invalid_argument(channel, workers, p, code, text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        # The plan alone: an input written after the refusal would race it
        # (grpc then reports the failed write as INTERNAL on this side).
        await run(channel, p, [])
    assert info.value.code() == code and text in (info.value.details() or "")
    # the service keeps serving
    assert fold_of(await run(channel, plan(("fold", "sum", {})), [b"1", b"2"])) == 3


async def test_undecodable_payload_is_invalid_argument(channel, workers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(channel, plan(("map", "fib_at", {})), [b"1", b"{not json", b"3"])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input" in (info.value.details() or "") and "element 1" in (info.value.details() or "")


async def test_operation_error_aborts_the_directive(channel, workers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(channel, plan(("map", "length", {})), [b'"ok"', b"5"])  # len(5) raises
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert (info.value.details() or "").startswith("Fatal operation error: ")


async def test_unoffered_operation_fails_with_failed_precondition(channel, workers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(channel, plan(("map", "nobody_offers_this", {})), [b"1"])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nobody_offers_this" in (info.value.details() or "")


async def test_two_directives_at_once(channel, workers) -> None:  # type: ignore[no-untyped-def]
    a, b = await asyncio.gather(
        run(channel, plan(("map", "length", {})), [encode("x" * i) for i in range(200)], 17),
        run(channel, plan(("map", "fib_at", {})), [encode(i) for i in range(200)], 13),
    )
    assert {k: json.loads(v) for k, v in items_of(a).items()} == {i: i for i in range(200)}
    fib = items_of(b)
    assert len(fib) == 200 and json.loads(fib[10]) == 55


async def test_tasks_go_only_to_workers_offering_the_operation(orchestrator, target, channel) -> None:  # type: ignore[no-untyped-def]
    lengths = WireWorker(target, "lengths", operations=["length"], monoids=[])
    fibs = WireWorker(target, "fibs", operations=["fib_at"], monoids=["sum"])
    runners = [asyncio.create_task(w.run()) for w in (lengths, fibs)]
    await wait_for(lambda: len(orchestrator.router.workers) == 2)
    await run(channel, plan(("map", "length", {})), [encode("ab")] * 20)
    assert fold_of(await run(channel, plan(("map", "fib_at", {}), ("fold", "sum", {})),
                             [encode(i) for i in range(1, 11)])) == 143
    assert {t.operation for t in lengths.executed} == {"length"}
    assert {t.operation for t in fibs.executed} == {"fib_at", "sum"}
    for w in (lengths, fibs):
        w.stop()
    await asyncio.gather(*runners, return_exceptions=True)


async def test_channel_api(channel, workers) -> None:  # type: ignore[no-untyped-def]
    stub = pb_grpc.ChannelServiceStub(channel)
    channel_id = (await stub.LeaseChannel(pb.LeaseChannelRequest())).channel_id

    async def publish():  # type: ignore[no-untyped-def]
        yield pb.PublishRequest(channel_id=channel_id, tasks=[
            pb.TaskSpec(task_id=i, operation="length", input=encode("x" * i), metadata=b"m%d" % i)
            for i in range(10)])

    assert (await stub.Publish(publish())).published == 10
    await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
    results = [r async for batch in stub.Subscribe(pb.SubscribeRequest(channel_id=channel_id))
               for r in batch.results]
    assert sorted((r.task_id, json.loads(r.ok.output), r.metadata) for r in results) == [
        (i, i, b"m%d" % i) for i in range(10)]
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await stub.Publish(publish())
    assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await stub.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=channel_id))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_worker_hello_errors(target, workers, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="squire.orchestrator")
    dup = WireWorker(target, "w1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await dup.run()
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == ["worker refused: a worker with id 'w1' is already connected"]
    empty = WireWorker(target, "empty", operations=[], monoids=[])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await empty.run()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_client_cancel_releases_the_directive(orchestrator, channel, target) -> None:  # type: ignore[no-untyped-def]
    # one worker offering nothing of this plan: tasks stay queued until cancel
    async def requests():  # type: ignore[no-untyped-def]
        yield pb.DirectiveRequest(plan=plan(("map", "length", {})))
        yield pb.DirectiveRequest(inputs=pb.InputBatch(items=[b'"x"'] * 100))
        await asyncio.sleep(3600)

    call = pb_grpc.DirectiveServiceStub(channel).RunDirective(requests())
    await call.read()  # started
    await wait_for(lambda: orchestrator.router.queues and
                   sum(q.depth for q in orchestrator.router.queues.values()) == 100)
    call.cancel()
    await wait_for(lambda: not orchestrator.router.channels)
    assert sum(q.depth for q in orchestrator.router.queues.values()) == 0
    status = await pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest())
    assert not status.directives and status.queue_depth == 0


async def test_status_reports_workers(channel, workers) -> None:  # type: ignore[no-untyped-def]
    status = await pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest())
    assert status.state == "running"
    assert sorted(w.worker_id for w in status.workers) == ["w1", "w2"]
    assert "fib_at" in status.workers[0].operations


async def test_health_flips_on_shutdown(orchestrator: Orchestrator, channel) -> None:  # type: ignore[no-untyped-def]
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    await pb_grpc.ChannelServiceStub(channel).LeaseChannel(pb.LeaseChannelRequest())  # keeps shutdown in its grace period
    stopping = asyncio.create_task(orchestrator.shutdown(grace=1.0))
    await wait_for(lambda: orchestrator.state.value == "draining")
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(channel, plan(("map", "length", {})), [b'"x"'])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await stopping


# ------------------------------------------------------------ RunDirectives


async def session_calls(channel, requests):  # type: ignore[no-untyped-def]
    """Send ``requests`` on one RunDirectives stream; events and ends by call id."""
    async def gen():  # type: ignore[no-untyped-def]
        for r in requests:
            yield r

    events: dict[int, list] = {}  # type: ignore[type-arg]
    ends: dict[int, pb.CallEnd] = {}
    async for msg in pb_grpc.DirectiveServiceStub(channel).RunDirectives(gen()):
        events.setdefault(msg.call_id, []).extend(msg.events)
        if msg.HasField("end"):
            assert msg.call_id not in ends, "a call ended twice"
            ends[msg.call_id] = msg.end
    return events, ends


async def test_session_multiplexes_directives(channel, workers) -> None:  # type: ignore[no-untyped-def]
    fib_sum = plan(("map", "fib_at", {}), ("fold", "sum", {}))
    lengths = plan(("map", "length", {}))
    requests = [
        pb.SessionRequest(call_id=1, plan=fib_sum,
                          inputs=pb.InputBatch(items=[encode(i) for i in range(1, 6)])),
        pb.SessionRequest(call_id=2, plan=lengths, end_input=True,
                          inputs=pb.InputBatch(items=[encode("ab"), encode("abc")])),
        pb.SessionRequest(call_id=1, end_input=True,
                          inputs=pb.InputBatch(items=[encode(i) for i in range(6, 11)])),
        pb.SessionRequest(call_id=3, plan=pb.Plan(), end_input=True),          # no stages
        pb.SessionRequest(call_id=4, inputs=pb.InputBatch(items=[b"1"])),     # no plan
        pb.SessionRequest(call_id=5, plan=lengths, end_input=True,
                          inputs=pb.InputBatch(items=[b"7"])),               # len(7) raises
    ]
    events, ends = await session_calls(channel, requests)
    assert ends[1].code == 0 and fold_of(events[1]) == 143
    assert events[1][0].HasField("started")
    assert ends[2].code == 0
    assert {k: json.loads(v) for k, v in items_of(events[2]).items()} == {0: 2, 1: 3}
    assert ends[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no stages" in ends[3].message
    assert ends[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "plan" in ends[4].message
    assert ends[5].code == grpc.StatusCode.ABORTED.value[0]
    assert ends[5].message.startswith("Fatal operation error: ")


async def test_session_end_cancels_open_calls(orchestrator, channel) -> None:  # type: ignore[no-untyped-def]
    # no workers: the call stays queued until the session goes away
    async def gen():  # type: ignore[no-untyped-def]
        yield pb.SessionRequest(call_id=1, plan=plan(("map", "length", {})),
                                inputs=pb.InputBatch(items=[b'"x"'] * 10))
        await asyncio.sleep(3600)

    call = pb_grpc.DirectiveServiceStub(channel).RunDirectives(gen())
    first = await call.read()
    assert first.events[0].HasField("started")
    await wait_for(lambda: sum(q.depth for q in orchestrator.router.queues.values()) == 10)
    call.cancel()
    await wait_for(lambda: not orchestrator.router.channels)
    assert sum(q.depth for q in orchestrator.router.queues.values()) == 0
