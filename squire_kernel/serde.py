"""Payload encoding: JSON (the default) and MessagePack, nothing else.

Every payload that crosses the network (task inputs, outputs, parameters,
fold operands) is bytes in one of these two formats. Pickle is never accepted.
Decoding is bounded: a payload larger than ``MAX_PAYLOAD_BYTES`` or nested
deeper than ``MAX_DEPTH`` is refused with :class:`PayloadError`.

JSON is read strictly: UTF-8 text (no byte-order mark, no UTF-16 or UTF-32)
without the ``NaN`` / ``Infinity`` / ``-Infinity`` literals Python's ``json``
accepts.
"""

from __future__ import annotations

import enum
import json
import re
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
            return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, OverflowError) as exc:
        raise PayloadError(
            f"cannot encode {type(value).__name__} as {serializer.name}: {exc}"
        ) from exc


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
                value = msgpack.unpackb(data, raw=False, strict_map_key=False)
            else:
                # Strict: UTF-8 only (``json.loads`` of bytes would also take
                # UTF-16 and UTF-32, and str refuses a byte-order mark), and
                # no NaN or infinity literals.
                value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except RecursionError:
            raise PayloadError(f"{what} is nested too deeply to decode") from None
        except Exception as exc:  # msgpack raises several unrelated types
            raise PayloadError(
                f"{what} is not valid {serializer.name}: {type(exc).__name__}: {exc}"
            ) from exc
    if size > MAX_DEPTH and isinstance(value, _CONTAINERS):  # each level takes a byte
        _check_depth(value, what)
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (NaN and infinities are refused)")


def decode_params(data: bytes, serializer: Serializer, *, what: str = "params") -> dict[str, Any]:
    """Decode keyword parameters: empty bytes mean none; otherwise a mapping."""
    if not data:
        return {}
    value = decode(data, serializer, what=what)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise PayloadError(f"{what} must encode a mapping of names to values")
    return value
