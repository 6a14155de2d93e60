"""Directive limits hold for RunDirectives sessions too: each call of a
session takes a directive slot, and a call past a limit ends alone with
RESOURCE_EXHAUSTED while the session and its other calls go on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._security import Limits

from .conftest import orchestrator, target, wait_for

PLAN = pb.Plan(stages=[pb.Stage(map=pb.MapStage(operation="fib_at"))])
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
Requests = asyncio.Queue[pb.SessionRequest | None]


async def _exercise(requests: Requests, started: set[int], ends: dict[int, pb.CallEnd]) -> None:
    for call_id in (1, 2, 3):  # the third is one too many for this client
        await requests.put(pb.SessionRequest(call_id=call_id, plan=PLAN))
    await wait_for(lambda: {1, 2} <= started and (3 in ends or 3 in started),
                   message="calls 1-3 to start or end")
    assert 3 in ends and 3 not in started, "the third call was not refused"
    assert ends[3].code == EXHAUSTED
    assert "max_directives_per_client limit reached" in ends[3].message
    await requests.put(pb.SessionRequest(call_id=1, end_input=True))
    await wait_for(lambda: 1 in ends, message="call 1 to end")
    assert ends[1].code == 0
    await requests.put(pb.SessionRequest(call_id=4, plan=PLAN, end_input=True))
    await requests.put(pb.SessionRequest(call_id=2, end_input=True))
    await wait_for(lambda: {2, 4} <= set(ends), message="calls 2 and 4 to end")
    assert ends[2].code == 0 and ends[4].code == 0


async def test_session_calls_take_directive_slots() -> None:
    limits = Limits(max_directives=10, max_directives_per_client=2)
    async with orchestrator(limits=limits) as orch:
        requests: Requests = asyncio.Queue()
        started: set[int] = set()
        ends: dict[int, pb.CallEnd] = {}

        async def stream() -> AsyncIterator[pb.SessionRequest]:
            while (request := await requests.get()) is not None:
                yield request

        async with grpc.aio.insecure_channel(target(orch)) as channel:
            call = pb_grpc.DirectiveServiceStub(channel).RunDirectives(stream(), timeout=30)

            async def read() -> None:
                async for event in call:
                    if any(e.HasField("started") for e in event.events):
                        started.add(event.call_id)
                    if event.HasField("end"):
                        ends[event.call_id] = event.end

            reader = asyncio.create_task(read())
            try:
                await _exercise(requests, started, ends)
            except BaseException:
                call.cancel()  # calls with open input would hold the session
                raise
            finally:
                await requests.put(None)
                await asyncio.gather(reader, return_exceptions=True)
