"""Frames on every sandbox channel: a 4-byte big-endian length, then UTF-8 JSON.

Used between the trainer and its zygotes (trusted on both ends) and for a child's result
(untrusted: the zygote parses it with a size cap and checks every field's type)."""

from __future__ import annotations

import json
import os
import struct

HEADER = struct.Struct(">I")


def encode(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def write_frame(fd: int, message: dict) -> None:
    data = memoryview(encode(message))
    while data:
        data = data[os.write(fd, data):]


def read_exact(fd: int, n: int) -> bytes | None:
    """n bytes from a blocking fd, or None at end of file."""
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> dict | None:
    """One message from a blocking fd, or None when the other side closed it."""
    head = read_exact(fd, HEADER.size)
    if head is None:
        return None
    body = read_exact(fd, HEADER.unpack(head)[0])
    return None if body is None else json.loads(body)


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete frame bodies at the front of data, and the bytes left over."""
    bodies, pos = [], 0
    while len(data) - pos >= HEADER.size:
        (n,) = HEADER.unpack_from(data, pos)
        if len(data) - pos - HEADER.size < n:
            break
        bodies.append(data[pos + HEADER.size: pos + HEADER.size + n])
        pos += HEADER.size + n
    return bodies, data[pos:]
