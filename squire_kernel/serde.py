"""Payload encoding: JSON (the default) and MessagePack, nothing else.

Every payload that crosses the network (task inputs, outputs, parameters,
fold operands) is bytes in one of these two formats. Pickle is never accepted.
Decoding is bounded: a payload larger than ``MAX_PAYLOAD_BYTES`` or nested
deeper than ``MAX_DEPTH`` is refused with :class:`PayloadError`.

JSON is read strictly: UTF-8 text (no byte-order mark, no UTF-16 or UTF-32)
without the ``NaN`` / ``Infinity`` / ``-Infinity`` literals Python's ``json``
accepts, nor a number too large for a float (``1e999``, which it reads as
infinity). Integers of any size stay exact in both formats: JSON writes and
reads them without Python's int-to-str digit limit (a local conversion
through :mod:`decimal`, not the process-global ``sys.set_int_max_str_digits``),
and MessagePack carries an integer beyond 64 bits as extension type
``BIG_INT_EXT`` (1): its signed big-endian two's-complement bytes.
"""

from __future__ import annotations

import decimal
import enum
import json
import math
import re
import sys
from typing import Any

import msgpack
import orjson

from squire_kernel.errors import PayloadError

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 256

# JSON goes through orjson (several times faster than the standard library)
# with the standard library's semantics: whatever orjson refuses or would
# read differently takes the standard library's path, so results and errors
# are those of ``json`` alone -- except that orjson also encodes UUIDs and
# Enum members (there is no option to refuse them).
# - Dataclasses, datetimes and subclasses of built-in types are passed
#   through by orjson and so refused by it, as ``json`` would refuse them.
# - orjson writes NaN and infinities as ``null``: an output with a ``null``
#   is re-encoded by ``json``, which refuses them (``allow_nan=False``).
# - orjson reads integers past 64 bits as floats: a payload with a run of 19
#   digits or more is read by ``json``, which keeps them exact.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads
_CONTAINERS = (dict, list)
# Values whose JSON cannot hold a float (and so no ``null`` written for NaN).
_NO_FLOATS = frozenset({int, str, bool, type(None)})
_UNSET = object()
BIG_INT_EXT = 1


class Serializer(enum.IntEnum):
    """Wire values equal ``squire.api.v1.Serializer``."""

    JSON = 1
    MSGPACK = 2

    @classmethod
    def from_wire(cls, value: int) -> Serializer:
        """Map a wire enum value (0 = unspecified = JSON) to a serializer."""
        if value == 0:
            return cls.JSON
        try:
            return cls(value)
        except ValueError:
            raise PayloadError(
                f"unknown serializer {value}: expected 1 (JSON) or 2 (MessagePack)"
            ) from None

    @classmethod
    def parse(cls, name: str | Serializer) -> Serializer:
        """Accept ``"json"`` / ``"msgpack"`` (any case) or a Serializer."""
        if isinstance(name, Serializer):
            return name
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown serializer {name!r}: use 'json' or 'msgpack'") from None


_MSGPACK = Serializer.MSGPACK


def encode(value: Any, serializer: Serializer = Serializer.JSON) -> bytes:
    """Encode ``value``; raise PayloadError when it is not representable."""
    if serializer is not _MSGPACK:  # the hot path: JSON through orjson
        try:
            out = _orjson_dumps(value, None, _ORJSON_OPTIONS)
        except TypeError:
            pass  # the standard library decides (and may refuse with its message)
        else:
            # Only a float can have become ``null``; the type test is much
            # cheaper than searching the output (see bench/README.md).
            kind = type(value)
            if kind in _NO_FLOATS or (out != b"null" if kind is float else out.find(b"null") < 0):
                return out
    try:
        if serializer is _MSGPACK:
            return msgpack.packb(  # type: ignore[no-any-return]
                value, use_bin_type=True, default=_msgpack_default
            )
        return _json_dumps(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise PayloadError(
            f"cannot encode {type(value).__name__} as {serializer.name}: {exc}"
        ) from exc


def _json_dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        # Past Python's int-to-str digit limit, ``json`` refuses an integer;
        # such integers go in as pre-written digits instead.
        huge = [False]
        converted = _huge_ints_as_fragments(value, huge)
        if not huge[0]:
            raise
        try:
            return _orjson_dumps(converted, None, _ORJSON_OPTIONS)
        except TypeError:
            raise exc from None


def _past_digit_limit(value: int) -> bool:
    # A bound from the bit length (log2(10) > 3.3): cheaper than counting
    # digits, and an integer just under the limit may take the decimal path.
    limit = sys.get_int_max_str_digits()
    return bool(limit) and value.bit_length() > limit * 3.3


def _int_digits(value: int) -> str:
    # decimal converts without the int-to-str digit limit (sys.set_int_max_str_digits
    # would lift it for the whole process).
    if _past_digit_limit(value):
        return str(decimal.Decimal(value))
    return int.__repr__(value)


def _parse_int(digits: str) -> int:
    limit = sys.get_int_max_str_digits()
    if limit and len(digits.lstrip("-")) > limit:
        return int(decimal.Decimal(digits))
    return int(digits)


def _huge_ints_as_fragments(value: Any, huge: list[bool]) -> Any:
    """``value`` as ``json`` would see it, with every integer ``json`` cannot
    write as an ``orjson.Fragment`` of its digits (``huge[0]`` set if any)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if _past_digit_limit(value):
            huge[0] = True
            return orjson.Fragment(_int_digits(value))
        return int.__index__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("Out of range float values are not JSON compliant")
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, dict):
        return {_json_key(k, huge): _huge_ints_as_fragments(v, huge) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_huge_ints_as_fragments(v, huge) for v in value]
    return value  # orjson decides (UUIDs and Enum members; anything else is refused)


def _json_key(key: Any, huge: list[bool]) -> str:
    # The standard library's conversion of mapping keys.
    if isinstance(key, str):
        return str.__str__(key)
    if key is True or key is False or key is None:
        return json.dumps(key)
    if isinstance(key, int):
        huge[0] = huge[0] or _past_digit_limit(key)
        return _int_digits(key)
    if isinstance(key, float):
        return _json_key_float(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")


def _json_key_float(key: float) -> str:
    if not math.isfinite(key):
        raise ValueError("Out of range float values are not JSON compliant")
    return float.__repr__(key)


def _msgpack_default(value: Any) -> Any:
    # msgpack calls this for an integer beyond 64 bits too.
    if isinstance(value, int) and not isinstance(value, bool):
        size = (value.bit_length() + 8) // 8  # one more bit for the sign
        return msgpack.ExtType(BIG_INT_EXT, value.to_bytes(size, "big", signed=True))
    raise TypeError(f"can not serialize {type(value).__name__!r} object")


def _msgpack_ext(code: int, data: bytes) -> Any:
    if code == BIG_INT_EXT:
        return int.from_bytes(data, "big", signed=True)
    return msgpack.ExtType(code, data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (NaN and infinities are refused)")


def _parse_float(text: str) -> float:
    # ``1e999`` is valid JSON that ``float`` reads as infinity: refused as the
    # literal would be (orjson refuses it too, which is how it got here).
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of a float's range (NaN and infinities are refused)")
    return value


def _check_depth(value: Any, what: str) -> None:
    # Iterative so a hostile payload cannot exhaust the interpreter stack.
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PayloadError(f"{what} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def decode(data: bytes, serializer: Serializer = Serializer.JSON, *, what: str = "payload") -> Any:
    """Decode ``data``; ``what`` names the field in the error message."""
    size = len(data)
    if size < 19 and serializer is not _MSGPACK:
        # The hot path for small values: too short for a 19-digit number or
        # for nesting past MAX_DEPTH, so orjson's reading is the answer.
        try:
            return _orjson_loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"{what} is {len(data)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    value: Any = _UNSET
    if serializer is not _MSGPACK and _LONG_NUMBER.search(data) is None:
        try:  # the hot path: JSON through orjson
            value = _orjson_loads(data)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, and words the error
    if value is _UNSET:
        try:
            if serializer is _MSGPACK:
                value = msgpack.unpackb(
                    data, raw=False, strict_map_key=False, ext_hook=_msgpack_ext
                )
            else:
                # Strict: UTF-8 only (``json.loads`` of bytes would also take
                # UTF-16 and UTF-32, and str refuses a byte-order mark), and
                # no NaN or infinity literals.
                value = json.loads(
                    data.decode("utf-8"),
                    parse_constant=_refuse_constant,
                    parse_float=_parse_float,
                    parse_int=_parse_int,
                )
        except RecursionError:
            raise PayloadError(f"{what} is nested too deeply to decode") from None
        except Exception as exc:  # msgpack raises several unrelated types
            raise PayloadError(
                f"{what} is not valid {serializer.name}: {type(exc).__name__}: {exc}"
            ) from exc
    if size > MAX_DEPTH and isinstance(value, _CONTAINERS):  # each level takes a byte
        _check_depth(value, what)
    return value


def decode_params(data: bytes, serializer: Serializer, *, what: str = "params") -> dict[str, Any]:
    """Decode keyword parameters: empty bytes mean none; otherwise a mapping."""
    if not data:
        return {}
    value = decode(data, serializer, what=what)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PayloadError(f"{what} must encode a mapping of names to values")
    return value
