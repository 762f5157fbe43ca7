"""The code a sandboxed child runs after fastazr._sandbox.harden(): read one job from fd 3,
run it, write one result frame to fd 4, exit. Nothing here is trusted by the parent.

Everything the runner calls is bound at import time in the zygote, so a job that rebinds
json.dumps, os.write or builtins.repr changes only its own view, and a job can only forge its
own result (which it could as well return)."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import sys

from .protocol import HEADER

JOB_FD, RESULT_FD = 3, 4
_dumps, _loads, _write, _read, _exit = json.dumps, json.loads, os.write, os.read, os._exit
_repr, _str, _type, _isinstance, _len = repr, str, type, isinstance, len
_compile, _exec, _eval, _BaseException = compile, exec, eval, BaseException
_pack = HEADER.pack


def install_stdio() -> None:
    """Text streams over fds 1 and 2, created once in the zygote; after fork they write to the
    child's output pipes. Block-buffered: a print costs no syscall until 8 KiB or exit."""
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")


def _describe(exc: BaseException) -> str:
    name = _type(exc).__name__
    try:
        message = _str(exc)
    except _BaseException:
        message = "<exception message could not be rendered>"
    if _len(message) > 2000:
        message = message[:2000] + f"... ({_len(message)} chars)"
    return f"{name}: {message}" if message else name


def _run(job: dict) -> dict:
    # 1 MiB held back so that after a MemoryError there is room to build and send the result.
    reserve = bytearray(1 << 20)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        code = _compile(job["program"], "<program>", "exec")
        _exec(code, namespace)
        if job["kind"] == "exec":
            return {"status": "ok"}
        entry = namespace.get(job["entry"])
        if entry is None:
            return {"status": "error", "error": f"NameError: the program defines no {job['entry']!r}"}
        source = job["args"].strip()
        args = _eval(_compile(f"({source},)", "<input>", "eval"), {"__builtins__": builtins}) if source else ()
        value = _repr(entry(*args))
        if not _isinstance(value, _str):
            return {"status": "error", "error": f"TypeError: __repr__ returned {_type(value).__name__}"}
        if _len(value) > job["max_value_chars"]:
            return {"status": "output_limit",
                    "error": f"repr of the result has {_len(value)} chars, over max_value_chars={job['max_value_chars']}"}
        return {"status": "ok", "value": _str.__str__(value)}
    except MemoryError as exc:
        exc.__traceback__ = None  # the frames it holds may hold the memory that ran out
        namespace.clear()
        del reserve
        return {"status": "memory", "error": _describe(exc)}
    except _BaseException as exc:
        return {"status": "error", "error": _describe(exc)}


def serve() -> None:
    """Run one job and exit. Called in a hardened child; never returns."""
    random.seed()
    chunks = []
    while True:
        chunk = _read(JOB_FD, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        outcome = _run(_loads(b"".join(chunks)))
    except _BaseException as exc:
        outcome = {"status": "memory" if _isinstance(exc, MemoryError) else "error", "error": _describe(exc)}
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    try:
        body = _dumps(outcome).encode()
        _write(RESULT_FD, _pack(_len(body)) + body)
    except _BaseException:
        _exit(71)
    _exit(0)
