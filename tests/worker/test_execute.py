"""prepare / Prepared.run / run_task: the pure execution shared by every executor."""

from __future__ import annotations

from typing import Any

import pytest
from squire import Registry

from squire_kernel.retry import FatalStrategy
from squire_kernel.serde import Serializer, decode, encode
from worker_service import _execute
from worker_service._abort import NEVER_ABORTED, AbortFlag, AbortMemory
from worker_service._execute import Prepared, prepare, run_task
from worker_service._model import APPLY, COMBINE, ErrorKind, Failure, Transient

from . import ops_for_tests

REGISTRY = Registry.from_modules(["worker.ops_for_tests"])
JSON, MSGPACK = Serializer.JSON, Serializer.MSGPACK


def apply(
    op: str, value: Any, params: dict[str, Any] | None = None, ser: Serializer = JSON, **kw: Any
) -> Any:
    return run_task(
        REGISTRY, APPLY, op, encode(params, ser) if params is not None else b"",
        encode(value, ser), (), ser.value, kw.pop("abort", NEVER_ABORTED), **kw,
    )


def combine(
    monoid: str, operands: list[Any], params: dict[str, Any] | None = None, ser: Serializer = JSON
) -> Any:
    return run_task(
        REGISTRY, COMBINE, monoid, encode(params, ser) if params is not None else b"",
        b"", [encode(o, ser) for o in operands], ser.value, NEVER_ABORTED,
    )


@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_apply_encodes_with_the_task_serializer(ser: Serializer) -> None:
    out = apply("echo", {"a": [1, 2.5, "x"]}, ser=ser)
    assert isinstance(out, bytes)
    assert decode(out, ser) == {"a": [1, 2.5, "x"]}
    assert out == encode({"a": [1, 2.5, "x"]}, ser)


def test_unspecified_serializer_is_json() -> None:
    out = run_task(REGISTRY, APPLY, "echo", b"", b"[1]", (), 0, NEVER_ABORTED)
    assert out == b"[1]"


@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_params_are_keyword_arguments(ser: Serializer) -> None:
    assert decode(apply("add", 40, {"n": 2}, ser=ser), ser) == 42


def test_abort_signal_is_passed_to_operations_that_take_it() -> None:
    flag = AbortFlag()
    assert apply("abort_kwarg", None, abort=flag) == b"false"
    flag.set()
    assert apply("abort_kwarg", None, abort=flag) == b"true"


@pytest.mark.parametrize(
    ("operands", "expected"), [([], 0), ([5], 5), ([1, 2, 3, 4], 10)]
)
@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_combine_folds_left_to_right(ser: Serializer, operands: list[int], expected: int) -> None:
    assert decode(combine("sum", operands, ser=ser), ser) == expected


def test_combine_params_and_order() -> None:
    assert decode(combine("join", ["a", "b", "c"], {"sep": "-"}), JSON) == "a-b-c"
    assert decode(combine("join", [], {"sep": "-"}), JSON) == ""


def failure(outcome: Any) -> Failure:
    assert isinstance(outcome, Failure), outcome
    return outcome


def test_unknown_operation_and_monoid() -> None:
    f = failure(apply("nope", 1))
    assert (f.kind, f.strategy) == (ErrorKind.UNKNOWN_OPERATION, FatalStrategy.TERMINATE)
    assert "'nope'" in f.message and "operation" in f.message
    f = failure(combine("echo", [1]))  # an operation, not a monoid
    assert f.kind is ErrorKind.UNKNOWN_OPERATION
    assert "monoid named 'echo'" in f.message


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((APPLY, "echo", b"", b"{not json", ()), "input"),
        ((APPLY, "add", b"[1]", b"1", ()), "params"),
        ((APPLY, "add", b"{bad", b"1", ()), "params"),
        ((COMBINE, "sum", b"", b"", (b"1", b"nope")), "operands[1]"),
    ],
)
def test_bad_payload_names_the_field(args: tuple[Any, ...], field: str) -> None:
    f = failure(run_task(REGISTRY, *args, JSON.value, NEVER_ABORTED))
    assert f.kind is ErrorKind.BAD_PAYLOAD
    assert f.strategy is FatalStrategy.TERMINATE
    assert f.message.startswith(field)


def test_unknown_serializer_is_a_bad_payload() -> None:
    f = failure(run_task(REGISTRY, APPLY, "echo", b"", b"1", (), 9, NEVER_ABORTED))
    assert f.kind is ErrorKind.BAD_PAYLOAD
    assert "serializer 9" in f.message


def test_unknown_task_kind_is_a_bad_payload() -> None:
    f = failure(run_task(REGISTRY, 7, "echo", b"", b"1", (), 1, NEVER_ABORTED))
    assert f.kind is ErrorKind.BAD_PAYLOAD


def test_fatal_error_keeps_its_strategy() -> None:
    f = failure(apply("ignored", 1))
    assert f == Failure(ErrorKind.OPERATION, "FatalError", "skip this element", FatalStrategy.IGNORE)
    f = failure(apply("fatal", 1))
    assert (f.error_type, f.strategy) == ("FatalError", FatalStrategy.TERMINATE)


def test_other_exceptions_terminate_with_their_class_name() -> None:
    f = failure(apply("value_error", 42))
    assert f == Failure(ErrorKind.OPERATION, "ValueError", "bad value 42", FatalStrategy.TERMINATE)
    f = failure(apply("add", 1, {"m": 2}))  # wrong keyword: the call itself fails
    assert (f.kind, f.error_type) == (ErrorKind.OPERATION, "TypeError")


def test_unencodable_output_is_the_operations_fault() -> None:
    f = failure(apply("unencodable", 1))
    assert f.kind is ErrorKind.OPERATION
    assert f.message.startswith("output:")


def test_transient_error_reports_the_next_delay(tmp_path: Any) -> None:
    counter = str(tmp_path / "c")
    out = apply("flaky", {"counter": counter, "fail": 9, "delay": 0.25}, retry=1)
    assert out == Transient("TransientError", "flaky run 1", 0.25)
    out = apply("always_transient", None, retry=2)
    assert out == Transient("TransientError", "still flaky", 0.0)
    out = apply("always_transient", None, retry=3)  # Immediate(2): exhausted
    assert out == Transient("TransientError", "still flaky", None)


def prepared(
    kind: int, name: str, params: dict[str, Any] | None = None, ser: Serializer = JSON
) -> Prepared:
    p = prepare(REGISTRY, kind, name, encode(params, ser) if params is not None else b"",
                ser.value)
    assert isinstance(p, Prepared), p
    return p


def test_a_prepared_operation_runs_many_tasks_like_run_task() -> None:
    add = prepared(APPLY, "add", {"n": 2})
    for x in (1, 40, -3):
        assert add.run(encode(x), (), NEVER_ABORTED) == apply("add", x, {"n": 2})
    join = prepared(COMBINE, "join", {"sep": "+"})
    assert join.run(b"", [b'"a"', b'"b"'], NEVER_ABORTED) == b'"a+b"'
    assert join.run(b"", [], NEVER_ABORTED) == b'""'


def test_prepare_fails_for_what_every_task_of_the_run_shares() -> None:
    assert failure(prepare(REGISTRY, APPLY, "nope", b"", 1)).kind is ErrorKind.UNKNOWN_OPERATION
    assert failure(prepare(REGISTRY, COMBINE, "echo", b"", 1)).kind is ErrorKind.UNKNOWN_OPERATION
    assert failure(prepare(REGISTRY, APPLY, "echo", b"", 9)).kind is ErrorKind.BAD_PAYLOAD
    assert failure(prepare(REGISTRY, 7, "echo", b"", 1)).kind is ErrorKind.BAD_PAYLOAD


def test_scalar_params_are_decoded_once_per_prepared_run(monkeypatch: Any) -> None:
    calls: list[bytes] = []
    real = _execute.decode_params

    def counting(data: bytes, ser: Serializer) -> dict[str, Any]:
        calls.append(data)
        return real(data, ser)

    monkeypatch.setattr(_execute, "decode_params", counting)
    add = prepared(APPLY, "add", {"n": 1})
    assert [add.run(encode(x), (), NEVER_ABORTED) for x in range(3)] == [b"1", b"2", b"3"]
    assert calls == [b'{"n":1}']


def test_mutable_params_are_fresh_for_every_task() -> None:
    # The operation appends to its parameter: a shared list would carry
    # the first task's value into the second task's result.
    run = prepared(APPLY, "append_to", {"items": [0]}).run
    assert decode(run(b"1", (), NEVER_ABORTED)) == [0, 1]
    assert decode(run(b"2", (), NEVER_ABORTED)) == [0, 2]


def test_bad_params_fail_each_task_after_its_input() -> None:
    # As with run_task, a task whose input and params are both bad is
    # reported for its input.
    run = prepare(REGISTRY, APPLY, "add", b"{bad", JSON.value)
    assert isinstance(run, Prepared)
    assert failure(run.run(b"{oops", (), NEVER_ABORTED)).message.startswith("input")
    for _ in range(2):
        f = failure(run.run(b"1", (), NEVER_ABORTED))
        assert (f.kind, f.message.startswith("params")) == (ErrorKind.BAD_PAYLOAD, True)


def test_a_prepared_run_retries_with_the_given_number() -> None:
    run = prepared(APPLY, "always_transient").run
    assert run(b"null", (), NEVER_ABORTED, 2) == Transient("TransientError", "still flaky", 0.0)
    assert run(b"null", (), NEVER_ABORTED, 3) == Transient("TransientError", "still flaky", None)


def test_abort_memory_forgets_after_its_time() -> None:
    now = [0.0]
    memory = AbortMemory(10.0, clock=lambda: now[0])
    memory.remember("a")
    now[0] = 5.0
    memory.remember("b")
    assert memory.is_aborted("a") and memory.is_aborted("b")
    now[0] = 10.0
    assert not memory.is_aborted("a") and memory.is_aborted("b")
    now[0] = 14.0
    memory.remember("b")  # remembered again: the clock restarts
    now[0] = 20.0
    memory.prune()
    assert len(memory) == 1 and memory.is_aborted("b")


def test_ops_module_offers_what_the_tests_expect() -> None:
    assert {"echo", "slow", "gated", "crash"} <= set(REGISTRY.operations)
    assert set(REGISTRY.monoids) == {"sum", "join"}
    assert REGISTRY.operations["slow"].accepts_abort
    assert ops_for_tests.GATE is not None
