"""A plan naming an operation nobody offers says what it waits for while it
waits (progress, the orchestrator's log, status) and, when the name is a
typo of an offered one, asks "did you mean ...?" when it fails."""

from __future__ import annotations

import logging

import grpc
import pytest
from squire import AsyncClient, FailedPrecondition, IndexedStream, Progress
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._server import Orchestrator

from .conftest import WireWorker, wait_for


async def test_a_typo_waits_visibly_then_fails_with_a_suggestion(
    target: str, workers: list[WireWorker], orchestrator: Orchestrator,
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="squire.orchestrator")
    status = pb_grpc.StatusServiceStub(channel)
    seen: list[Progress] = []
    async with AsyncClient(target) as client:
        run = IndexedStream.from_iterable([20, 21]).map("fib_att").aevents(client)
        with pytest.raises(FailedPrecondition) as info:
            async for event in run:
                if isinstance(event, Progress):
                    seen.append(event)
                    if event.waiting and not any(p.waiting for p in seen[:-1]):
                        reply = await status.GetStatus(pb.GetStatusRequest(), timeout=5)
                        (d,) = reply.directives
                        assert d.progress.waiting == event.waiting
    assert info.value.code == "FAILED_PRECONDITION"
    assert "did you mean 'fib_at'?" in str(info.value)
    waiting = [p.waiting for p in seen if p.waiting]
    assert waiting, "no progress event said what the directive waits for"
    assert "waiting for a worker that offers operation 'fib_att'" in waiting[0]
    assert "did you mean 'fib_at'?" in waiting[0]
    await wait_for(lambda: any("'fib_att'" in r.getMessage() for r in caplog.records))
