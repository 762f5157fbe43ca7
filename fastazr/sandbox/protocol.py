"""Frames on the sandbox's channels: a 4-byte big-endian length, then the body.

Trainer <-> zygote (trusted on both ends): the body is marshal'd, ~5x cheaper than JSON
both ways: a batch is (timeout_s, [marshal'd job dict, ...]), its reply [marshal'd result
dict, ...]. Child -> zygote (untrusted): the body is a status byte, a 4-byte value
length, the value's UTF-8, then the error's UTF-8; the zygote checks every part. Children
write it through _sandbox.send_result, and the C SIGSYS handler (csrc/sandbox/harden.c)
writes the same layout."""

from __future__ import annotations

import marshal
import os
import struct

HEADER = struct.Struct(">I")


# Index = the status byte of a child frame; 4 is hard-coded in the C SIGSYS handler.
CHILD_STATUSES = ("ok", "error", "memory", "output_limit", "violation", "setup")
VALUE_LENGTH = struct.Struct(">I")


def encode(message) -> bytes:
    body = marshal.dumps(message)
    return HEADER.pack(len(body)) + body


def parse_child_frame(body: bytes) -> tuple[str, str, str] | None:
    """(status, value, error) from an untrusted frame body, or None if it is malformed."""
    if len(body) < 5 or body[0] >= len(CHILD_STATUSES):
        return None
    (n,) = VALUE_LENGTH.unpack_from(body, 1)
    if 5 + n > len(body):
        return None
    try:
        return (CHILD_STATUSES[body[0]], body[5:5 + n].decode("utf-8", "surrogatepass"),
                body[5 + n:].decode("utf-8", "surrogatepass"))
    except UnicodeDecodeError:
        return None


def write_frame(fd: int, message) -> None:
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


def read_frame(fd: int):
    """One message from a blocking fd, or None when the other side closed it."""
    head = read_exact(fd, HEADER.size)
    if head is None:
        return None
    body = read_exact(fd, HEADER.unpack(head)[0])
    return None if body is None else marshal.loads(body)


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
