"""Run one task: decode, call the operation or monoid, encode.

``run_task`` is a pure function of its arguments so the same code runs
inline, in a thread, or in a process-pool child (see ``_child``). It never
raises for anything the task or the operation did: every failure becomes a
``Failure`` (final) or a ``Transient`` (the worker decides about retrying).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squire._errors import FatalError, PayloadError, TransientError
from squire._ops import AbortSignal, Registry
from squire._serde import MAX_PAYLOAD_BYTES, Serializer, decode, decode_params, encode

from worker_service._model import APPLY, COMBINE, ErrorKind, Failure, Outcome, Transient

# An output must fit in one gRPC message next to its result envelope.
MAX_OUTPUT_BYTES = MAX_PAYLOAD_BYTES - 64 * 1024

_NO_KWARGS: dict[str, Any] = {}  # never mutated

# Wire value -> serializer, without an enum lookup per task (0 means JSON).
_SERIALIZERS = {0: Serializer.JSON, **{int(s): s for s in Serializer}}


def run_task(
    registry: Registry,
    kind: int,
    operation: str,
    params: bytes,
    input: bytes,
    operands: Sequence[bytes],
    serializer: int,
    abort: AbortSignal,
    retry: int = 1,
) -> Outcome:
    """Execute one task; return its encoded output or how it failed.

    ``retry`` is the number the next retry would have (1 on the first run):
    a ``TransientError`` is answered with its strategy's ``delay(retry)``.
    """
    ser = _SERIALIZERS.get(serializer)
    if ser is None:
        try:
            ser = Serializer.from_wire(serializer)
        except PayloadError as exc:
            return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", str(exc))
    try:
        if kind == APPLY:
            op = registry.operations.get(operation)
            if op is None:
                return _unknown("operation", operation)
            value = decode(input, ser, what="input")
            kwargs = decode_params(params, ser) if params else _NO_KWARGS
            if op.accepts_abort:
                kwargs = {**kwargs, "abort": abort}
            call: Any = op.fn
            values: Any = (value,)
        elif kind == COMBINE:
            monoid = registry.monoids.get(operation)
            if monoid is None:
                return _unknown("monoid", operation)
            values = ([decode(o, ser, what=f"operands[{i}]") for i, o in enumerate(operands)],)
            kwargs = decode_params(params, ser)
            call = monoid.combine_all
        else:
            return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", f"unknown task kind {kind}")
    except PayloadError as exc:
        return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", str(exc))

    try:
        # The common call, a one-argument operation, without argument packing.
        result = call(*values, **kwargs) if kwargs else call(*values)
    except TransientError as exc:
        return Transient(type(exc).__name__, str(exc), _next_delay(exc, retry))
    except FatalError as exc:
        return Failure(ErrorKind.OPERATION, type(exc).__name__, str(exc), exc.strategy)
    # SystemExit too: an operation must not be able to end the worker.
    except (Exception, SystemExit) as exc:
        return Failure(ErrorKind.OPERATION, type(exc).__name__, str(exc))

    try:
        output = encode(result, ser)
    except PayloadError as exc:
        # The operation returned something the task's serializer cannot carry:
        # the operation's fault, not the payload's.
        return Failure(ErrorKind.OPERATION, "PayloadError", f"output: {exc}")
    if len(output) > MAX_OUTPUT_BYTES:
        return Failure(
            ErrorKind.OPERATION,
            "PayloadError",
            f"output is {len(output)} bytes, over the {MAX_OUTPUT_BYTES} limit",
        )
    return output


def _unknown(what: str, name: str) -> Failure:
    return Failure(
        ErrorKind.UNKNOWN_OPERATION,
        "UnknownOperation",
        f"this worker offers no {what} named {name!r}",
    )


def _next_delay(exc: TransientError, retry: int) -> float | None:
    try:
        delay = exc.retry.delay(retry)
    except Exception:
        # A broken strategy must not crash the worker; treat it as exhausted.
        return None
    return None if delay is None else max(0.0, float(delay))
