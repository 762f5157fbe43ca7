"""The code a sandboxed child runs once _sandbox.spawn() has hardened it: run the one job it was
forked for (already compiled by the zygote), write one result frame to fd 3, exit. Nothing
here is trusted by the parent.

Everything the runner calls is bound at import time in the zygote, so a job that rebinds
os._exit, gc.enable or builtins.repr changes only its own view, and a job can only forge its
own result (which it could as well return). The zygote reseeds random before each fork
(its at-fork hook does not run: see _sandbox.spawn)."""

from __future__ import annotations

import builtins
import gc
import io
import os
import sys
from types import CodeType
from typing import NamedTuple

from .. import _sandbox
from .protocol import CHILD_STATUSES

RESULT_FD = 3
_exit, _gc_enable = os._exit, gc.enable
_send, _status_index = _sandbox.send_result, CHILD_STATUSES.index
_repr, _str, _type, _isinstance, _len = repr, str, type, isinstance, len
_exec, _eval, _BaseException = exec, eval, BaseException


class Job(NamedTuple):
    """A job as the zygote compiled it. entry None means exec the program only."""

    program: CodeType
    entry: str | None
    args: CodeType | None  # the argument tuple's expression; None for no arguments


def compile_job(kind: str, program: str, entry: str | None, args_source: str) -> Job:
    """Compile in the zygote, before forking: a child then starts from bytecode (~110 fewer
    copy-on-write faults, about 0.3 ms on the dev VM) and a syntax error costs no fork.
    compile() runs no code from its input; its time and memory grow with the source, which
    Sandbox caps at max_program_bytes."""
    code = compile(program, "<program>", "exec", dont_inherit=True)
    if kind == "exec":
        return Job(code, None, None)
    source = args_source.strip()
    args = compile(f"({source},)", "<input>", "eval", dont_inherit=True) if source else None
    return Job(code, entry, args)


def install_stdio() -> None:
    """Text streams over fds 1 and 2, created once in the zygote; after fork they write to the
    child's output pipes. Block-buffered: a print costs no syscall until 8 KiB or exit."""
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")


def describe(exc: BaseException) -> str:
    name = _type(exc).__name__
    try:
        message = _str(exc)
    except _BaseException:
        message = "<exception message could not be rendered>"
    if _len(message) > 2000:
        message = message[:2000] + f"... ({_len(message)} chars)"
    return f"{name}: {message}" if message else name


def _run(job: Job, max_value_chars: int) -> tuple[str, str | None, str | None]:
    # 1 MiB held back so that after a MemoryError there is room to build and send the result.
    reserve = bytearray(1)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        _exec(job.program, namespace)
        if job.entry is None:
            return "ok", None, None
        entry = namespace.get(job.entry)
        if entry is None:
            return "error", None, f"NameError: the program defines no {job.entry!r}"
        args = _eval(job.args, {"__builtins__": builtins}) if job.args is not None else ()
        value = _repr(entry(*args))
        if not _isinstance(value, _str):
            return "error", None, f"TypeError: __repr__ returned {_type(value).__name__}"
        if _len(value) > max_value_chars:
            return "output_limit", None, f"repr of the result has {_len(value)} chars, over max_value_chars={max_value_chars}"
        return "ok", _str.__str__(value), None
    except MemoryError as exc:
        exc.__traceback__ = None  # the frames it holds may hold the memory that ran out
        namespace.clear()
        del reserve
        return "memory", None, describe(exc)
    except _BaseException as exc:
        return "error", None, describe(exc)


def serve(job: Job, max_value_chars: int) -> None:
    """Run one job and exit. Called in a hardened child; never returns."""
    _gc_enable()  # the zygote runs with it off
    try:
        outcome = _run(job, max_value_chars)
    except _BaseException as exc:
        outcome = ("memory" if _isinstance(exc, MemoryError) else "error", None, describe(exc))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    try:
        status, value, error = outcome
        _send(RESULT_FD, _status_index(status), value, error)
    except _BaseException:
        _exit(71)
    _exit(0)
