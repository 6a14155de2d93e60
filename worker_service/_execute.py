"""Run tasks: decode, call the operation or monoid, encode.

Execution has two steps. ``prepare`` resolves what the tasks of a run share
-- tasks next to each other in a batch nearly always have the same kind,
operation, params and serializer -- and ``Prepared.run`` does the per-task
rest. ``run_task`` is both steps for one task. All of it is a pure function
of its arguments, so the same code runs inline, in a thread, or in a
process-pool child (see ``_child``). Nothing here raises for anything the
task or the operation did: every failure becomes a ``Failure`` (final) or a
``Transient`` (the worker decides about retrying).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from squire_kernel.errors import FatalError, PayloadError, TransientError
from squire_kernel.operations import AbortSignal, Registry
from squire_kernel.serde import MAX_PAYLOAD_BYTES, Serializer, decode, decode_params, encode
from worker_service._model import APPLY, COMBINE, ErrorKind, Failure, Outcome, Transient

# An output must fit in one gRPC message next to its result envelope.
MAX_OUTPUT_BYTES = MAX_PAYLOAD_BYTES - 64 * 1024

_NO_KWARGS: dict[str, Any] = {}  # never mutated

# Wire value -> serializer, without an enum lookup per task (0 means JSON).
_SERIALIZERS = {0: Serializer.JSON, **{int(s): s for s in Serializer}}

# Parameter values no operation can change: decoded params made only of these
# are shared by the tasks of a run. Anything else (a list, a mapping) is
# decoded afresh per task, as an operation may mutate its arguments.
_IMMUTABLE = frozenset({str, int, float, bool, bytes, type(None)})


class Prepared:
    """An operation or monoid ready to run tasks that share their kind,
    operation, params and serializer: per task, only decode, call, encode."""

    __slots__ = ("_accepts_abort", "_call", "_combine", "_kwargs", "_params", "_ser")

    def __init__(
        self,
        call: Callable[..., Any],
        combine: bool,
        params: bytes,
        ser: Serializer,
        accepts_abort: bool,
    ) -> None:
        self._call = call
        self._combine = combine
        self._params = params
        self._ser = ser
        self._accepts_abort = accepts_abort
        # None: decode the params per task. Bad params are decoded (and so
        # reported) per task too, after the input, as a task always was.
        self._kwargs: dict[str, Any] | None = _NO_KWARGS
        if params:
            try:
                kwargs = decode_params(params, ser)
            except PayloadError:
                self._kwargs = None
            else:
                shared = all(type(v) in _IMMUTABLE for v in kwargs.values())
                self._kwargs = kwargs if shared else None

    def run(
        self, input: bytes, operands: Sequence[bytes], abort: AbortSignal, retry: int = 1
    ) -> Outcome:
        """Execute one task; return its encoded output or how it failed.

        ``retry`` is the number the next retry would have (1 on the first
        run): a ``TransientError`` is answered with its strategy's
        ``delay(retry)``.
        """
        ser = self._ser
        try:
            if self._combine:
                value: Any = [
                    decode(o, ser, what=f"operands[{i}]") for i, o in enumerate(operands)
                ]
            else:
                value = decode(input, ser, what="input")
            kwargs = self._kwargs
            if kwargs is None:
                kwargs = decode_params(self._params, ser)
        except PayloadError as exc:
            return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", str(exc))
        if self._accepts_abort:
            kwargs = {**kwargs, "abort": abort}

        call = self._call
        try:
            # The common call, a one-argument operation, without argument packing.
            result = call(value, **kwargs) if kwargs else call(value)
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
            # The operation returned something the task's serializer cannot
            # carry: the operation's fault, not the payload's.
            return Failure(ErrorKind.OPERATION, "PayloadError", f"output: {exc}")
        if len(output) > MAX_OUTPUT_BYTES:
            return Failure(
                ErrorKind.OPERATION,
                "PayloadError",
                f"output is {len(output)} bytes, over the {MAX_OUTPUT_BYTES} limit",
            )
        return output


def prepare(
    registry: Registry, kind: int, operation: str, params: bytes, serializer: int
) -> Prepared | Failure:
    """What tasks with these fields share, or the failure every one of them gets."""
    ser = _SERIALIZERS.get(serializer)
    if ser is None:
        try:
            ser = Serializer.from_wire(serializer)
        except PayloadError as exc:
            return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", str(exc))
    if kind == APPLY:
        op = registry.operations.get(operation)
        if op is None:
            return _unknown("operation", operation)
        return Prepared(op.fn, False, params, ser, op.accepts_abort)
    if kind == COMBINE:
        monoid = registry.monoids.get(operation)
        if monoid is None:
            return _unknown("monoid", operation)
        return Prepared(monoid.combine_all, True, params, ser, False)
    return Failure(ErrorKind.BAD_PAYLOAD, "PayloadError", f"unknown task kind {kind}")


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
    """Execute one task: ``prepare``, then ``Prepared.run``."""
    prepared = prepare(registry, kind, operation, params, serializer)
    if isinstance(prepared, Failure):
        return prepared
    return prepared.run(input, operands, abort, retry)


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
