"""Scenario 8: a flood of malformed requests, and oversized messages.

1,000 requests drawn from a mix of protocol misuse, sent through raw gRPC
stubs (the SDK would refuse to build most of them). Every one must get its
status code with a message, the orchestrator keeps its pid, its memory
growth stays under RSS_BOUND_MIB, and a directive running meanwhile
completes exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import squire
from procs import Cluster, cluster, wait_until
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

from squire_kernel.serde import encode

from .support import (
    Figures,
    Ledger,
    MapRun,
    assert_squares,
    consume,
    square_map,
    start_workers,
)

FLOOD = 1_000
RSS_BOUND_MIB = 50
TIMEOUT = 10.0
MIB = 1024 * 1024

PARAMS = encode({"tag": "flood"})
SQUARE = pb.Stage(map=pb.MapStage(operation="fault_square", params=PARAMS))


def _plan(**fields: Any) -> pb.DirectiveRequest:
    return pb.DirectiveRequest(plan=pb.Plan(**fields))


def _inputs(*items: bytes) -> pb.DirectiveRequest:
    return pb.DirectiveRequest(inputs=pb.InputBatch(items=list(items)))


class Flood:
    """One malformed request per kind; each returns (code, details)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.directives = pb_grpc.DirectiveServiceStub(channel)
        self.channels = pb_grpc.ChannelServiceStub(channel)
        self.workers = pb_grpc.WorkerServiceStub(channel)

    def kinds(self) -> dict[str, tuple[grpc.StatusCode, Callable[[], None]]]:
        bad = grpc.StatusCode
        return {
            "plan with no stages": (bad.INVALID_ARGUMENT, lambda: self._directive(_plan())),
            "empty stage": (bad.INVALID_ARGUMENT,
                            lambda: self._directive(_plan(stages=[pb.Stage()]))),
            "unknown serializer": (bad.INVALID_ARGUMENT, lambda: self._directive(
                _plan(stages=[SQUARE], serializer=7))),  # type: ignore[arg-type]
            "undecodable params": (bad.INVALID_ARGUMENT, lambda: self._directive(_plan(
                stages=[pb.Stage(map=pb.MapStage(operation="fault_square", params=b"\xff{"))]))),
            "inputs before the plan": (bad.INVALID_ARGUMENT,
                                       lambda: self._directive(_inputs(b"1"))),
            "fold on a non-monoid": (bad.INVALID_ARGUMENT, lambda: self._directive(_plan(
                stages=[pb.Stage(fold=pb.FoldStage(monoid="fault_square"))]))),
            "input that does not decode": (bad.INVALID_ARGUMENT, lambda: self._directive(
                _plan(stages=[SQUARE]), _inputs(b"1", b"{not json"))),
            "subscribe to an unknown channel": (bad.NOT_FOUND, lambda: list(
                self.channels.Subscribe(pb.SubscribeRequest(channel_id="nope"),
                                        timeout=TIMEOUT))),
            "publish to an unknown channel": (bad.NOT_FOUND, lambda: self._publish("nope")),
            "close an unknown channel": (bad.NOT_FOUND, lambda: self.channels.CloseChannel(
                pb.CloseChannelRequest(channel_id="nope"), timeout=TIMEOUT)),
            "publish to a closed channel": (bad.FAILED_PRECONDITION, self._publish_closed),
            "publish without a channel id": (bad.INVALID_ARGUMENT, lambda: self._publish("")),
            "worker hello with no operations": (bad.INVALID_ARGUMENT, lambda: self._hello(
                pb.WorkerHello(worker_id="empty", capacity=1))),
            "duplicate worker id": (bad.ALREADY_EXISTS, lambda: self._hello(
                pb.WorkerHello(worker_id="w0", operations=["fault_square"], capacity=1))),
        }

    def _directive(self, *requests: pb.DirectiveRequest) -> None:
        for _ in self.directives.RunDirective(iter(requests), timeout=TIMEOUT):
            pass

    def _publish(self, channel_id: str) -> None:
        spec = pb.TaskSpec(task_id=1, operation="fault_square", input=b"1", params=PARAMS)
        self.channels.Publish(iter([pb.PublishRequest(channel_id=channel_id, tasks=[spec])]),
                              timeout=TIMEOUT)

    def _publish_closed(self) -> None:
        channel_id = self.channels.LeaseChannel(pb.LeaseChannelRequest(),
                                                timeout=TIMEOUT).channel_id
        self.channels.CloseChannel(pb.CloseChannelRequest(channel_id=channel_id),
                                   timeout=TIMEOUT)
        try:
            self._publish(channel_id)
        finally:
            self.channels.ReleaseChannel(pb.ReleaseChannelRequest(channel_id=channel_id),
                                         timeout=TIMEOUT)

    def _hello(self, hello: pb.WorkerHello) -> None:
        for _ in self.workers.Connect(iter([pb.WorkerMessage(hello=hello)]), timeout=TIMEOUT):
            pass


def _send(kinds: dict[str, tuple[grpc.StatusCode, Callable[[], None]]], name: str) -> str:
    expected, call = kinds[name]
    try:
        call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
        assert code == expected, f"{name}: {code.name} ({details}), expected {expected.name}"
        assert details, f"{name}: {code.name} without a message"
        return details  # type: ignore[no-any-return]
    raise AssertionError(f"{name}: accepted, expected {expected.name}")


def _healthy(c: Cluster, ledger: Ledger, n: int) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        try:
            with squire.Client(c.target) as client:
                out.append(consume(square_map(n, "healthy", sleep=0.002).events(client),
                                   ledger, "healthy"))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_flood_of_malformed_requests(ledger: Ledger, env: dict[str, str], logs: Path,
                                     figures: Figures) -> None:
    rng = random.Random(3)
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0", "w1"], concurrency=2)
        pid = c.orchestrator.pid
        with grpc.insecure_channel(c.target) as channel:
            flood = Flood(channel)
            kinds = flood.kinds()
            names = sorted(kinds)
            for name in names * 4:  # warm up every code path before measuring
                _send(kinds, name)
            rss_before = c.rss_kib()
            thread, out = _healthy(c, ledger, 3_000)
            counts: Counter[str] = Counter()
            examples: dict[str, str] = {}
            start = time.monotonic()
            for _ in range(FLOOD):
                name = rng.choice(names)
                examples[name] = _send(kinds, name)
                counts[name] += 1
            seconds = time.monotonic() - start
            thread.join(timeout=60)
            rss_after = c.rss_kib()
        assert c.orchestrator.poll() is None and c.orchestrator.pid == pid
        assert out and isinstance(out[0], MapRun), f"the healthy directive failed: {out!r}"
        ledger.tally("healthy", 3_000).assert_exactly_once()
        assert_squares(out[0].values, 3_000)
        assert set(counts) == set(names)
        growth_mib = (rss_after - rss_before) / 1024
        assert growth_mib < RSS_BOUND_MIB, f"orchestrator RSS grew {growth_mib:.1f} MiB"
        status = c.status()
        assert {w.worker_id for w in status.workers} == {"w0", "w1"}
        assert not status.channels and not status.directives, "the flood left state behind"
    figures.add("8. malformed flood", "malformed requests (14 kinds)", FLOOD)
    figures.add("8. malformed flood", "answered with the expected status code", FLOOD)
    figures.add("8. malformed flood", "orchestrator pid unchanged", "yes")
    figures.add("8. malformed flood", "orchestrator RSS before the flood, MiB",
                round(rss_before / 1024, 1))
    figures.add("8. malformed flood", f"orchestrator RSS growth, MiB (bound {RSS_BOUND_MIB})",
                round(growth_mib, 1))
    figures.add("8. malformed flood", "flood duration, s", round(seconds, 2))
    figures.add("8. malformed flood", "concurrent directive", "3,000 tasks, lost 0, duplicated 0")


# ------------------------------------------------------------- message size


def _oversized_inputs(size: int) -> Iterator[pb.DirectiveRequest]:
    yield _plan(stages=[SQUARE])
    yield _inputs(b"1" * size)


def test_oversized_messages_get_resource_exhausted(env: dict[str, str], logs: Path) -> None:
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0"], concurrency=1, executor="thread")
        # A client that lifts its own send limit: the orchestrator's 64 MiB
        # receive limit answers, naming the limit.
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(c.target, options=options) as channel:
            stub = pb_grpc.DirectiveServiceStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                for _ in stub.RunDirective(_oversized_inputs(65 * MIB), timeout=60):
                    pass
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert str(64 * MIB) in raised.value.details()  # type: ignore[attr-defined]
        # The SDK refuses to send it in the first place, with the same code.
        with squire.Client(c.target) as client, pytest.raises(squire.ResourceExhausted) as sdk:
            squire.IndexedStream.from_iterable(["x" * (65 * MIB)]).map(
                "fault_square", tag="big").run(client)
        assert str(64 * MIB) in sdk.value.message
        assert c.orchestrator.poll() is None
        # the orchestrator still serves
        with squire.Client(c.target) as client:
            assert squire.IndexedStream.from_iterable(range(10)).map(
                "fault_square", tag="after").run(client) == [i * i for i in range(10)]


def test_large_results_are_delivered_in_messages_under_the_limit(
    env: dict[str, str], logs: Path
) -> None:
    # 100 outputs of 1 MiB each, all ready before the client reads: together
    # far over the 64 MiB message limit, so they must leave in several
    # messages (regression: one 100 MiB ItemBatch / ResultBatch failed with
    # RESOURCE_EXHAUSTED "Sent message larger than max").
    with cluster(env=env, log_dir=logs) as c:
        start_workers(c, ["w0"], concurrency=4, executor="thread")
        with squire.Client(c.target) as client:
            run = squire.IndexedStream.from_iterable(range(100)).map(
                "fault_blob", size=MIB).events(client)
            assert isinstance(next(run), squire.DirectiveStarted)
            wait_until(lambda: all(d.progress.completed == 100
                                   for d in c.status().directives), 30,
                       message="all 100 map results ready")
            sizes: dict[int, int] = {}
            for event in run:
                if isinstance(event, squire.ItemBatch):
                    for index, value in event.items:
                        sizes[index] = len(value)
            assert sizes == {i: MIB for i in range(100)}

            with client.lease_channel() as channel:
                channel.sender.publish("fault_blob", range(100), params={"size": MIB})
                channel.sender.close()
                wait_until(lambda: [ch.completed for ch in c.status().channels] == [100], 30,
                           message="all 100 channel results ready")
                outcomes = list(channel.receiver)
            assert sorted(o.task_id for o in outcomes) == list(range(1, 101))
            assert all(o.ok and len(o.value) == MIB for o in outcomes)
