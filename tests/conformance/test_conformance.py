"""The conformance suite, run with the Python SDK.

Every case of ``cases.json`` runs against a live orchestrator and Python
workers (real processes on 127.0.0.1, started as the file's ``harness``
says) and must give the case's ``expect``. The Node client runs the same file
(``clients/node/test/conformance.test.js``); both must agree.

The ``wire_cases`` send bytes to a method and read bytes back, below any
client API: frames that do not parse, and server reflection on both
protocol versions.

The ``directive_cases`` are steps on durable directives by id: a detached
submit, attach, ListDirectives, CancelDirective, through the SDK's
``IndexedStream.submit``, ``Client.attach``, ``directives`` and ``cancel``.

The ``tenant_cases`` are such steps, each made by a named tenant (a
``Client(target, token=...)`` per tenant) against a second orchestrator, the
``tenant_harness``, started with a tenants file of random tokens: isolation
of list, attach, cancel and status between tenants, an operator who sees
everyone's work, ``max_directives``, and tokens that name no tenant.

A case goes through the SDK (``IndexedStream(...).map(...).fold(...).run``)
whenever the SDK can express it. Raw input bytes, and plans the SDK refuses
to build (a fold before the last stage), go through the generated stubs, so
the orchestrator's own answer is checked too.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from procs import Cluster, cluster  # tests/ is on sys.path: it has no __init__.py
from squire import Client, FoldValue, IndexedStream, ItemBatch, RpcError
from squire.api.v1 import squire_pb2 as pb
from squire.api.v1 import squire_pb2_grpc as pb_grpc

CASES_FILE = Path(__file__).with_name("cases.json")
SUITE: dict[str, Any] = json.loads(CASES_FILE.read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = SUITE["cases"]
WIRE_CASES: list[dict[str, Any]] = SUITE["wire_cases"]
DIRECTIVE_CASES: list[dict[str, Any]] = SUITE["directive_cases"]
TENANT_HARNESS: dict[str, Any] = SUITE["tenant_harness"]
TENANT_CASES: list[dict[str, Any]] = SUITE["tenant_cases"]
STEP_KINDS = ("submit", "attach", "list", "cancel")
TENANT_STEP_KINDS = (*STEP_KINDS, "status")
TENANT_OPTIONS = {"weight": int, "max_directives": int, "max_queued_tasks": int, "admin": bool}
# The identities a tenant step may name instead of a tenant.
OTHER_TOKENS = ("unknown", "worker")
EXPECT_KEYS = ({"value"}, {"items"}, {"error_code", "message_contains"},
               {"error_code", "message_starts_with"})
WIRE_SERIALIZER = {"json": pb.SERIALIZER_JSON, "msgpack": pb.SERIALIZER_MSGPACK}
RPC_TIMEOUT = 60.0


@dataclass(frozen=True)
class Outcome:
    """What a run gave: a value (fold value or map results by index), or an error."""

    value: Any = None
    code: str | None = None
    message: str = ""


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def live() -> Iterator[Cluster]:
    harness = SUITE["harness"]
    workers = harness["workers"]
    with cluster(orchestrator_args=tuple(harness["orchestrator_args"])) as c:
        ids = {f"conformance-{i}" for i in range(workers["count"])}
        for worker_id in sorted(ids):
            c.start_worker(worker_id, ops=workers["ops"], executor=workers["executor"],
                           concurrency=workers["concurrency"], wait=False)
        c.wait_for_workers(ids)
        yield c


@pytest.fixture(scope="module")
def client(live: Cluster) -> Iterator[Client]:
    with Client(live.target) as c:
        yield c


# ------------------------------------------------------------------ running


def _encode(value: Any, serializer: str) -> bytes:
    if serializer == "msgpack":
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    return json.dumps(value, separators=(",", ":")).encode()


def _decode(data: bytes, serializer: str) -> Any:
    if serializer == "msgpack":
        return msgpack.unpackb(data, raw=False)
    return json.loads(data)


def _stream(case: dict[str, Any]) -> IndexedStream:
    """The case's plan built with the SDK; ValueError if the SDK refuses it."""
    stream = IndexedStream.from_iterable(case["inputs"])
    for stage in case["plan"]:
        params = stage.get("params", {})
        stream = stream.map(stage["map"], **params) if "map" in stage else stream.fold(
            stage["fold"], **params)
    return stream


def _run_sdk(client: Client, stream: IndexedStream, serializer: str) -> Outcome:
    try:
        return Outcome(value=stream.run(client, serializer=serializer))
    except RpcError as exc:
        return Outcome(code=exc.code, message=exc.message)


def _run_wire(target: str, case: dict[str, Any]) -> Outcome:
    """RunDirective through the generated stubs: the plan, one batch of items, half-close."""
    serializer = case.get("serializer", "json")
    if "raw_inputs" in case:
        items = [text.encode() for text in case["raw_inputs"]]
    else:
        items = [_encode(value, serializer) for value in case["inputs"]]
    stages = []
    for stage in case["plan"]:
        params = _encode(stage["params"], serializer) if stage.get("params") else b""
        if "map" in stage:
            stages.append(pb.Stage(map=pb.MapStage(operation=stage["map"], params=params)))
        else:
            stages.append(pb.Stage(fold=pb.FoldStage(monoid=stage["fold"], params=params)))
    plan = pb.Plan(stages=stages, serializer=WIRE_SERIALIZER[serializer], expected_items=len(items))
    requests = [pb.DirectiveRequest(plan=plan)]
    if items:
        requests.append(pb.DirectiveRequest(inputs=pb.InputBatch(items=items)))
    values: dict[int, Any] = {}
    fold: list[Any] = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.DirectiveServiceStub(channel)
        try:
            for event in stub.RunDirective(iter(requests), timeout=RPC_TIMEOUT):
                kind = event.WhichOneof("kind")
                if kind == "items":
                    for item in event.items.items:
                        values[item.index] = _decode(item.value, serializer)
                elif kind == "fold":
                    fold.append(_decode(event.fold.value, serializer))
        except grpc.RpcError as exc:
            return Outcome(code=exc.code().name, message=exc.details() or "")
    if case["plan"] and "fold" in case["plan"][-1]:
        assert len(fold) == 1, f"expected one fold value, got {fold}"
        return Outcome(value=fold[0])
    assert sorted(values) == list(range(len(items))), f"missing results: {sorted(values)}"
    return Outcome(value=[values[i] for i in range(len(items))])


def _check(case: dict[str, Any], outcome: Outcome) -> None:
    expect = case["expect"]
    if "error_code" in expect:
        assert outcome.code == expect["error_code"], (
            f"expected {expect['error_code']}, got {outcome}")
        if "message_contains" in expect:
            assert expect["message_contains"] in outcome.message, outcome.message
        if "message_starts_with" in expect:
            assert outcome.message.startswith(expect["message_starts_with"]), outcome.message
        return
    assert outcome.code is None, f"expected success, got {outcome.code}: {outcome.message}"
    expected = expect["items"] if "items" in expect else expect["value"]
    assert outcome.value == expected


# -------------------------------------------------------------------- tests


def test_cases_file_is_well_formed() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert set(SUITE) == {"about", "harness", "cases", "wire_cases", "directive_cases",
                          "tenant_harness", "tenant_cases"}
    assert set(SUITE["harness"]) == {"orchestrator_args", "workers"}
    for case in CASES:
        where = case["name"]
        assert set(case) <= {"name", "about", "plan", "serializer", "inputs", "raw_inputs",
                             "expect"}, where
        assert ("inputs" in case) != ("raw_inputs" in case), where
        assert case.get("serializer", "json") in WIRE_SERIALIZER, where
        assert set(case["expect"]) in EXPECT_KEYS, where
        for stage in case["plan"]:
            assert len({"map", "fold"} & set(stage)) == 1, where
            assert set(stage) <= {"map", "fold", "params"}, where


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_case(case: dict[str, Any], client: Client, live: Cluster) -> None:
    serializer = case.get("serializer", "json")
    if "raw_inputs" in case:
        outcome = _run_wire(live.target, case)  # the SDK always encodes its inputs
    else:
        try:
            stream = _stream(case)
        except ValueError:
            # The SDK refuses this plan before sending it; the orchestrator must too.
            assert case["expect"].get("error_code") == "INVALID_ARGUMENT", (
                "the SDK refused a plan the case expects to be accepted")
            outcome = _run_wire(live.target, case)
        else:
            outcome = _run_sdk(client, stream, serializer)
    _check(case, outcome)


def test_wire_cases_are_well_formed() -> None:
    names = [case["name"] for case in CASES + WIRE_CASES + DIRECTIVE_CASES + TENANT_CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    for case in WIRE_CASES:
        where = case["name"]
        assert set(case) <= {"name", "about", "method", "kind", "request_hex", "expect"}, where
        assert case["kind"] in ("unary", "stream"), where
        bytes.fromhex(case["request_hex"])
        assert set(case["expect"]) in ({"error_code", "message_contains"},
                                       {"response_contains"}), where


def identity(data: bytes) -> bytes:
    return data


def _call_wire(target: str, case: dict[str, Any]) -> tuple[list[bytes], Outcome]:
    """Send the case's one request frame (then half-close); the response frames
    and how the call ended."""
    request = bytes.fromhex(case["request_hex"])
    with grpc.insecure_channel(target) as channel:
        try:
            if case["kind"] == "unary":
                call = channel.unary_unary(case["method"], request_serializer=identity,
                                           response_deserializer=identity)
                return [call(request, timeout=RPC_TIMEOUT)], Outcome()
            stream = channel.stream_stream(case["method"], request_serializer=identity,
                                           response_deserializer=identity)
            return list(stream(iter([request]), timeout=RPC_TIMEOUT)), Outcome()
        except grpc.RpcError as exc:
            return [], Outcome(code=exc.code().name, message=exc.details() or "")


@pytest.mark.parametrize("case", WIRE_CASES, ids=[case["name"] for case in WIRE_CASES])
def test_wire_case(case: dict[str, Any], live: Cluster) -> None:
    responses, outcome = _call_wire(live.target, case)
    expect = case["expect"]
    if "error_code" in expect:
        _check(case, outcome)
        return
    assert outcome.code is None, f"expected success, got {outcome.code}: {outcome.message}"
    answer = b"".join(responses)
    missing = [text for text in expect["response_contains"] if text.encode() not in answer]
    assert missing == [], f"the answer lacks {missing}"


# ------------------------------------------------------- directive cases


def _check_steps_well_formed(case: dict[str, Any], *, tenants: bool) -> None:
    """A directive case's steps (``tenants``: a tenant case's, where every
    step names who makes it, and ``status`` steps, failing list and status
    steps and ``message_as_unknown_id`` are allowed too)."""
    where = case["name"]
    assert set(case) <= {"name", "about", "steps"}, where
    who = {"tenant", "token"} if tenants else set()
    bound: set[str] = set()
    for step in case["steps"]:
        kinds = [kind for kind in (TENANT_STEP_KINDS if tenants else STEP_KINDS) if kind in step]
        assert len(kinds) == 1, where
        kind = kinds[0]
        if tenants:
            assert len(set(step) & who) == 1, f"{where}: a step names a tenant or a token"
            if "tenant" in step:
                assert step["tenant"] in TENANT_HARNESS["tenants"], where
            else:
                assert step["token"] in OTHER_TOKENS, where
        expect = step.get("expect")
        if expect is not None:
            keys = set(expect) - {"message_as_unknown_id"}
            assert keys in (*EXPECT_KEYS, {"ok"}), where
            if "message_as_unknown_id" in expect:
                assert tenants and kind in ("attach", "cancel"), where
                assert expect["message_as_unknown_id"] is True, where
                assert expect["error_code"] == "NOT_FOUND", where
        if kind == "submit":
            assert set(step) - who <= {"submit", "as", "expect"}, where
            assert set(step["submit"]) <= {"plan", "inputs", "serializer"}, where
            if "as" in step:
                assert "expect" not in step or "ok" in step["expect"], where
                bound.add(step["as"])
        elif kind in ("list", "status"):
            if step[kind] == {} and tenants:  # the call itself fails
                assert set(step) - who == {kind, "expect"}, where
                assert "error_code" in step["expect"], where
                continue
            assert set(step) - who == {kind}, where
            assert len(set(step[kind]) & {"includes", "excludes"}) == 1, where
            target = step[kind].get("includes") or step[kind]["excludes"]
            assert target["ref"] in bound, where
        else:
            assert set(step) - who == {kind, "expect"}, where
            target = step[kind]
            assert len(set(target) & {"id", "ref"}) == 1 and set(target) <= {"id", "ref"}, where
            assert "id" in target or target["ref"] in bound, where


def test_directive_cases_are_well_formed() -> None:
    for case in DIRECTIVE_CASES:
        _check_steps_well_formed(case, tenants=False)


def _directive_id(step_target: dict[str, Any], ids: dict[str, str]) -> str:
    return ids[step_target["ref"]] if "ref" in step_target else str(step_target["id"])


def _attach(client: Client, directive_id: str) -> Outcome:
    """Attach by id and read to the end: the fold value if one came, else the
    map results in index order (every index from 0 exactly once)."""
    values: dict[int, Any] = {}
    fold: list[Any] = []
    try:
        for event in client.attach(directive_id):
            if isinstance(event, ItemBatch):
                for index, value in event.items:
                    assert index not in values, f"index {index} delivered twice"
                    values[index] = value
            elif isinstance(event, FoldValue):
                fold.append(event.value)
    except RpcError as exc:
        return Outcome(code=exc.code, message=exc.message)
    if fold:
        assert len(fold) == 1 and not values, f"one fold value and no items, got {fold}, {values}"
        return Outcome(value=fold[0])
    assert sorted(values) == list(range(len(values))), f"missing results: {sorted(values)}"
    return Outcome(value=[values[i] for i in range(len(values))])


def _cancel(client: Client, directive_id: str) -> Outcome:
    try:
        client.cancel(directive_id)
    except RpcError as exc:
        return Outcome(code=exc.code, message=exc.message)
    return Outcome()


def _rows(call: Callable[[], list[dict[str, Any]]]) -> Outcome:
    """The rows a ListDirectives (or GetStatus) call gives, by directive id."""
    try:
        return Outcome(value={row["directive_id"]: row for row in call()})
    except RpcError as exc:
        return Outcome(code=exc.code, message=exc.message)


def _running(client: Client) -> list[dict[str, Any]]:
    """GetStatus's directives (the running ones), as plain data."""
    rows: list[dict[str, Any]] = client.status()["directives"]
    return rows


def _check_ended(step: dict[str, Any], outcome: Outcome, where: str) -> None:
    """A step whose ``expect`` is ``{"ok": true}`` or absent must succeed."""
    if "expect" in step and "ok" not in step["expect"]:
        _check(step, outcome)
    else:
        assert outcome.code is None, f"{where}: {outcome}"


def _check_rows(step: dict[str, Any], kind: str, outcome: Outcome, ids: dict[str, str],
                defaults: dict[str, Any], where: str) -> None:
    spec = step[kind]
    if "expect" in step:
        _check(step, outcome)
        return
    assert outcome.code is None, f"{where}: {outcome}"
    rows = outcome.value
    if "includes" in spec:
        want = spec["includes"]
        directive_id = ids[want["ref"]]
        assert directive_id in rows, f"{where}: {directive_id} not listed in {rows}"
        row = rows[directive_id]
        for field, value in want.items():
            if field != "ref":
                assert row.get(field, defaults.get(field)) == value, f"{where}: {field} of {row}"
    else:
        assert ids[spec["excludes"]["ref"]] not in rows, f"{where}: {rows}"


def _as_unknown(step: dict[str, Any], outcome: Outcome, directive_id: str,
                again: Callable[[str], Outcome], where: str) -> None:
    """``message_as_unknown_id``: the same call by the same caller for a
    made-up id fails alike, with the same message once each id reads ID."""
    if not step["expect"].get("message_as_unknown_id"):
        return
    unknown_id = secrets.token_hex(16)
    unknown = again(unknown_id)
    assert unknown.code == outcome.code, f"{where}: an unknown id gave {unknown}"
    assert outcome.message.replace(directive_id, "ID") == unknown.message.replace(
        unknown_id, "ID"), f"{where}: {outcome.message!r} is not {unknown.message!r}"


def _run_steps(case: dict[str, Any], client_of: Callable[[dict[str, Any]], Client],
               submitted: dict[str, tuple[str, Client]] | None = None) -> None:
    """Run a case's steps in order, each with ``client_of(step)``. Each id a
    submit names is also put in ``submitted`` with the client that made it."""
    ids: dict[str, str] = {}
    for number, step in enumerate(case["steps"]):
        where = f"step {number} of {case['name']}"
        client = client_of(step)
        if "submit" in step:
            spec = step["submit"]
            stream = _stream(spec)
            try:
                directive_id = stream.submit(client, serializer=spec.get("serializer", "json"))
            except RpcError as exc:
                outcome = Outcome(code=exc.code, message=exc.message)
            else:
                outcome = Outcome(value=directive_id)
                if "as" in step:
                    ids[step["as"]] = directive_id
                    if submitted is not None:
                        submitted[step["as"]] = (directive_id, client)
            _check_ended(step, outcome, where)
        elif "list" in step:
            _check_rows(step, "list", _rows(client.directives), ids, _DEFAULTS, where)
        elif "status" in step:
            outcome = _rows(partial(_running, client))
            _check_rows(step, "status", outcome, ids, {}, where)
        elif "attach" in step:
            directive_id = _directive_id(step["attach"], ids)
            outcome = _attach(client, directive_id)
            _check(step, outcome)
            _as_unknown(step, outcome, directive_id, partial(_attach, client), where)
        else:
            directive_id = _directive_id(step["cancel"], ids)
            outcome = _cancel(client, directive_id)
            _check_ended(step, outcome, where)
            if "ok" not in step["expect"]:
                _as_unknown(step, outcome, directive_id, partial(_cancel, client), where)


@pytest.mark.parametrize("case", DIRECTIVE_CASES, ids=[case["name"] for case in DIRECTIVE_CASES])
def test_directive_case(case: dict[str, Any], client: Client) -> None:
    _run_steps(case, lambda _step: client)


# Client.directives() leaves out fields at their proto default.
_DEFAULTS: dict[str, Any] = {"detached": False, "attached": False, "received": 0, "completed": 0,
                             "plan": "", "message": "", "tenant": ""}


# ---------------------------------------------------------- tenant cases


def _tenants_toml(tenants: dict[str, dict[str, Any]], tokens: dict[str, str]) -> str:
    """The tenants file: each tenant's options, and its token's SHA-256."""
    lines: list[str] = []
    for name, options in tenants.items():
        digest = hashlib.sha256(tokens[name].encode()).hexdigest()
        lines += [f"[tenants.{name}]", f'token_sha256 = ["{digest}"]']
        # JSON's integers and booleans are TOML's too.
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class TenantCluster:
    """The tenant harness: its cluster, and a client per identity (each
    tenant's name, and the OTHER_TOKENS)."""

    cluster: Cluster
    clients: dict[str, Client]

    def client_of(self, step: dict[str, Any]) -> Client:
        return self.clients[step["tenant"] if "tenant" in step else "token:" + step["token"]]


@pytest.fixture(scope="module")
def tenant_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantCluster]:
    tenants: dict[str, dict[str, Any]] = TENANT_HARNESS["tenants"]
    tokens = {name: f"{name}-{secrets.token_hex(16)}" for name in tenants}
    worker_token = "worker-" + secrets.token_hex(16)
    file = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    file.write_text(_tenants_toml(tenants, tokens), encoding="utf-8")
    file.chmod(0o600)
    workers = SUITE["harness"]["workers"]
    args = (*TENANT_HARNESS["orchestrator_args"], "--tenants", str(file))
    # Both the orchestrator (which accepts it) and the workers (which send it).
    env = {"SQUIRE_WORKER_TOKEN": worker_token}
    with cluster(orchestrator_args=args, env=env, token=next(iter(tokens.values()))) as c:
        ids = {f"conformance-tenants-{i}" for i in range(workers["count"])}
        for worker_id in sorted(ids):
            c.start_worker(worker_id, ops=workers["ops"], executor=workers["executor"],
                           concurrency=workers["concurrency"], wait=False)
        c.wait_for_workers(ids)
        identities = {**tokens, "token:unknown": "unknown-" + secrets.token_hex(16),
                      "token:worker": worker_token}
        clients = {who: Client(c.target, token=token) for who, token in identities.items()}
        try:
            yield TenantCluster(c, clients)
        finally:
            for each in clients.values():
                each.close()


def test_tenant_harness_is_well_formed() -> None:
    assert set(TENANT_HARNESS) <= {"about", "tenants", "orchestrator_args"}
    assert isinstance(TENANT_HARNESS["orchestrator_args"], list)
    assert "--tenants" not in TENANT_HARNESS["orchestrator_args"], "the runner adds it"
    for name, options in TENANT_HARNESS["tenants"].items():
        assert name not in OTHER_TOKENS and name.replace("_", "").replace("-", "").isalnum(), name
        for key, value in options.items():
            assert key in TENANT_OPTIONS, f"{name}: {key}"
            assert type(value) is TENANT_OPTIONS[key], f"{name}: {key} = {value!r}"


def test_tenant_cases_are_well_formed() -> None:
    for case in TENANT_CASES:
        _check_steps_well_formed(case, tenants=True)


@pytest.mark.parametrize("case", TENANT_CASES, ids=[case["name"] for case in TENANT_CASES])
def test_tenant_case(case: dict[str, Any], tenant_live: TenantCluster) -> None:
    submitted: dict[str, tuple[str, Client]] = {}
    try:
        _run_steps(case, tenant_live.client_of, submitted)
    finally:
        # Leave no directive running for the next case (max_directives counts
        # them), whether or not this one got to its last step.
        for directive_id, owner in submitted.values():
            _cancel(owner, directive_id)
