"""Leadership without processes (issue 16): two grpc.aio orchestrators in
this process on one real Postgres. One leads; the other is a standby that
answers health NOT_SERVING, says "standby" in its status and refuses
directive and worker calls with UNAVAILABLE naming the leader; when the
leader shuts down it gives the lease up and the standby leads at once."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from orchestrator_service._server import UP_SERVICE, Orchestrator, OrchestratorConfig, State

from .conftest import wait_for


def config(store: str) -> OrchestratorConfig:
    return OrchestratorConfig(port=0, grace=1.0, tick_interval=0.05, store=store, lease_ttl=3.0)


async def health(port: int, service: str = "") -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def test_one_leads_the_other_stands_by_then_takes_over(pg_url: str) -> None:
    leader = Orchestrator(config(pg_url))
    standby = Orchestrator(config(pg_url))
    await leader.start()
    await leader.wait_leading()
    await standby.start()
    try:
        assert leader.state is State.RUNNING and standby.state is State.STANDBY
        await wait_for(lambda: standby.leadership.leader is not None)
        assert await health(leader.port) == "SERVING"
        assert await health(standby.port) == "NOT_SERVING"
        assert await health(standby.port, UP_SERVICE) == "SERVING"  # ready, as a standby
        async with grpc.aio.insecure_channel(f"127.0.0.1:{standby.port}") as channel:
            status = await pb_grpc.StatusServiceStub(channel).GetStatus(pb.GetStatusRequest())
            assert status.state == "standby"
            plan = pb.Plan(serializer=pb.SERIALIZER_JSON)
            plan.stages.add().map.operation = "fib_at"
            call = pb_grpc.DirectiveServiceStub(channel).RunDirective(
                iter([pb.DirectiveRequest(plan=plan)]))
            try:
                async for _ in call:
                    pass
                raise AssertionError("a standby served a directive")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
                assert f"the leader is 127.0.0.1:{leader.port} (epoch {leader.epoch})" in (
                    exc.details() or "")
        await leader.shutdown()  # gives the lease up at once
        await standby.wait_leading()
        assert standby.state is State.RUNNING and standby.epoch == leader.epoch + 1
        assert await health(standby.port) == "SERVING"
    finally:
        await standby.shutdown()
        await leader.shutdown()
