"""Frames between the process executor and its children: a 4-byte big-endian
length, then one MessagePack value.

MessagePack rather than pickle: a frame holds only lists, strings, bytes and
numbers, and the payload bytes that came from the network pass through as
bytes -- nothing a child or the parent reads can run code when decoded.

Parent to child, one frame per batch: a list of tasks, each
``[slot, kind, operation, params, input, operands, serializer, retry,
estimate]`` (the seconds the parent expects it to run).

Child to parent: ``[READY, operations, monoids]`` once its imports worked
(``[FAILED, traceback]`` if not), then ``[RESULTS, results]`` where a result
is ``[slot, seconds, output]`` (ok), ``[slot, seconds, None, error_type,
message, delay]`` (transient), ``[slot, seconds, kind, error_type, message,
strategy, retries_exhausted, retries]`` (final failure), or ``[slot, 0.0]``:
not run, its abort signal was set before it started. ``[WITHDRAWN, slots]``
answers a SIGUSR1: those tasks were in its queue, not started, and are the
parent's again.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

from squire_kernel.retry import FatalStrategy
from worker_service._model import ErrorKind, Failure, Outcome, Transient

READY = 0
FAILED = 1
RESULTS = 2
WITHDRAWN = 3

_HEADER = struct.Struct(">I")
MAX_FRAME = (1 << 32) - 1


def pack(value: Any) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError(f"a frame of {len(body)} bytes is over the {MAX_FRAME} limit")
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, value: Any) -> None:
    """Write one frame to a blocking socket (the child's side)."""
    sock.sendall(pack(value))


class Reader:
    """Turns bytes as they arrive into whole frames' values."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer
        buffer += data
        out: list[Any] = []
        at, end = 0, len(buffer)
        unpack = msgpack.unpackb
        with memoryview(buffer) as view:
            while end - at >= 4:
                (size,) = _HEADER.unpack_from(buffer, at)
                if end - at - 4 < size:
                    break
                out.append(unpack(view[at + 4 : at + 4 + size], raw=False))
                at += 4 + size
        if at:
            del buffer[:at]
        return out



def outcome(row: list[Any]) -> Outcome:
    """The outcome a result row (of three or more fields) carries."""
    if len(row) == 3:
        output: bytes = row[2]
        return output
    if row[2] is None:
        return Transient(row[3], row[4], row[5])
    return Failure(ErrorKind(row[2]), row[3], row[4], FatalStrategy(row[5]), row[6], row[7])
