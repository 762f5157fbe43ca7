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

# Lengths are 4-byte big-endian integers, read with int.from_bytes rather than struct: struct
# is a C extension, and its 5 mappings (2 with private pages) in the zygote cost every fork
# and exit ~5 us (~0.7 us a file mapping, ~1.8 us one with private pages, 2-core VM).
HEADER_SIZE = 4


def length_at(data, pos: int = 0) -> int:
    """The 4-byte big-endian length at data[pos:]."""
    return int.from_bytes(data[pos:pos + 4], "big")


# Index = the status byte of a child frame; 4 is hard-coded in the C SIGSYS handler.
CHILD_STATUSES = ("ok", "error", "memory", "output_limit", "violation", "setup")


def encode(message) -> bytes:
    body = marshal.dumps(message)
    return len(body).to_bytes(4, "big") + body


def parse_child_frame(body: bytes) -> tuple[str, str, str] | None:
    """(status, value, error) from an untrusted frame body, or None if it is malformed."""
    if len(body) < 5 or body[0] >= len(CHILD_STATUSES):
        return None
    n = length_at(body, 1)
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
    head = read_exact(fd, HEADER_SIZE)
    if head is None:
        return None
    body = read_exact(fd, length_at(head))
    return None if body is None else marshal.loads(body)


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete frame bodies at the front of data, and the bytes left over."""
    bodies, pos = [], 0
    while len(data) - pos >= HEADER_SIZE:
        n = length_at(data, pos)
        if len(data) - pos - HEADER_SIZE < n:
            break
        bodies.append(data[pos + HEADER_SIZE: pos + HEADER_SIZE + n])
        pos += HEADER_SIZE + n
    return bodies, data[pos:]
