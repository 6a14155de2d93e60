"""Payload codec: orjson for speed, with the standard library's semantics."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import pytest

from squire_kernel.errors import PayloadError
from squire_kernel.serde import Serializer, decode, encode

VALUES = [
    0, -1, 2**63 - 1, 2**64, -(2**70), 1.5, 1e300, "", "é", "\u2028", None, True,
    [1, [2, [3]]], {"a": {"b": [None, 1.25]}}, "null", ["null", None],
]


@pytest.mark.parametrize("value", VALUES)
def test_json_round_trips_exactly(value: object) -> None:
    assert decode(encode(value)) == value
    # and reads the same as the standard library reads it
    assert json.loads(encode(value)) == value


@pytest.mark.parametrize("value", [math.nan, math.inf, [1, -math.inf], {"x": math.nan}])
def test_json_refuses_nan_and_infinity(value: object) -> None:
    with pytest.raises(PayloadError, match="Out of range float"):
        encode(value)


def test_json_keeps_big_integers_exact_when_decoding() -> None:
    big = 123456789012345678901234567890
    assert decode(str(big).encode()) == big
    assert decode(b"[%d, 1]" % big) == [big, 1]
    assert decode(b"-9223372036854775809") == -(2**63) - 1


@dataclasses.dataclass
class Point:
    x: int


@pytest.mark.parametrize("value", [Point(1), datetime.date(2026, 1, 1), {1, 2}, b"raw"])
def test_json_refuses_what_the_standard_library_refuses(value: object) -> None:
    with pytest.raises(PayloadError, match="cannot encode"):
        encode(value)


def test_json_encodes_non_string_keys_like_the_standard_library() -> None:
    assert decode(encode({1: "a"})) == {"1": "a"}


@pytest.mark.parametrize("data", [b'"\\ud800"', b" [1] ", b'"\xc3\xa9"'])
def test_json_reads_what_the_standard_library_reads(data: bytes) -> None:
    assert decode(data) == json.loads(data)


@pytest.mark.parametrize(
    "data",
    [
        b"NaN", b"Infinity", b"-Infinity", b"[1, NaN]", b'{"x": -Infinity}',
        b"[" + b"1," * 20 + b"NaN]",  # past the short-payload fast path
        # numbers a float cannot hold: float() reads them as infinity
        b"1e999", b"-1E+400", b'{"x": [1.5, 2e308]}', b"[12345678901234567890, 1e999]",
    ],
)
def test_json_refuses_nan_and_infinity_literals(data: bytes) -> None:
    with pytest.raises(PayloadError, match=r"input is not valid JSON: .*refused"):
        decode(data, what="input")


@pytest.mark.parametrize(
    "data",
    [
        b"\xef\xbb\xbf1",  # UTF-8 with a byte-order mark
        "[1]".encode("utf-16"), "[1]".encode("utf-16-le"), "[1]".encode("utf-32"),
        ("\"" + "é" * 20 + "\"").encode("latin-1"),
    ],
)
def test_json_is_utf8_only(data: bytes) -> None:
    with pytest.raises(PayloadError, match="input is not valid JSON"):
        decode(data, what="input")


# Past Python's int-to-str digit limit (4300 digits by default).
HUGE = 7 * 10**49_999 + 12345


@pytest.mark.parametrize("serializer", list(Serializer))
@pytest.mark.parametrize(
    "value", [HUGE, -HUGE, [HUGE, 1, {"a": -HUGE, "b": [1.5, None]}], 2**64, -(2**63) - 1],
    ids=["huge", "-huge", "nested", "2**64", "-2**63-1"],  # str() of HUGE is refused
)
def test_integers_of_any_size_round_trip_exactly(serializer: Serializer, value: object) -> None:
    assert decode(encode(value, serializer), serializer) == value


def test_huge_integers_are_plain_json_digits() -> None:
    data = encode([HUGE])
    assert len(data) == 50_002 and data.startswith(b"[7000") and data.endswith(b"12345]")
    assert decode(encode({HUGE: 1})) == {data[1:-1].decode(): 1}


def test_huge_integers_keep_the_other_json_refusals() -> None:
    with pytest.raises(PayloadError, match="Out of range float"):
        encode([HUGE, math.nan])
    with pytest.raises(PayloadError, match="cannot encode"):
        encode([HUGE, Point(1)])


def test_msgpack_big_integers_are_extension_type_1() -> None:
    # signed big-endian two's complement, in as few bytes as hold the sign
    assert encode(2**64, Serializer.MSGPACK) == b"\xc7\x09\x01\x01" + bytes(8)
    assert encode(-(2**64), Serializer.MSGPACK) == b"\xc7\x09\x01\xff" + bytes(8)


def test_bad_json_is_a_payload_error_naming_the_field() -> None:
    with pytest.raises(PayloadError, match="result 3 is not valid JSON"):
        decode(b"{nope", what="result 3")


def test_msgpack_round_trips() -> None:
    value = {"a": [1, 2.5, "x", None, b"\x00"]}
    assert decode(encode(value, Serializer.MSGPACK), Serializer.MSGPACK) == value


@pytest.mark.parametrize("serializer", list(Serializer))
def test_nesting_is_refused_past_max_depth_and_only_there(serializer: Serializer) -> None:
    from squire_kernel.serde import MAX_DEPTH

    def nested(depth: int) -> object:
        value: object = 0
        for _ in range(depth):
            value = [value]
        return value

    assert decode(encode(nested(MAX_DEPTH), serializer), serializer) == nested(MAX_DEPTH)
    with pytest.raises(PayloadError, match="nested deeper than"):
        decode(encode(nested(MAX_DEPTH + 1), serializer), serializer)


@pytest.mark.parametrize("data", [b"", b" ", b"[1", b"1,2", b"nul"])
def test_short_invalid_json_is_a_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError, match="input is not valid JSON"):
        decode(data, what="input")
