"""The code a sandboxed child runs once _sandbox.spawn() has hardened it: run the one job it was
forked for (compiled in the zygote's compiler child, unmarshalled here), write one result frame
to fd 3, exit. Nothing here is trusted by the parent.

Everything the runner calls is bound at import time in the zygote, so a job that rebinds
os._exit, gc.enable or builtins.repr changes only its own view, and a job can only forge its
own result (which it could as well return). The zygote reseeds random before each fork
(its at-fork hook does not run: see _sandbox.spawn)."""

from __future__ import annotations

import builtins
import gc
import io
import marshal
import os
import sys
import warnings

from .. import _sandbox
from .protocol import CHILD_STATUSES

RESULT_FD = 3
_exit, _gc_enable = os._exit, gc.enable
_send, _status_index = _sandbox.send_result, CHILD_STATUSES.index
_repr, _str, _type, _isinstance, _len = repr, str, type, isinstance, len
_exec, _eval, _BaseException = exec, eval, BaseException
_bytes, _bytearray, _object = bytes, bytearray, object
# A type's own name, past any metaclass __name__; a str's exact copy, past a subclass's methods.
_type_name, _exact = type.__dict__["__name__"].__get__, str.__str__
_loads = marshal.loads
_stamp = _sandbox.stamp  # per-stage stamps: a no-op unless SandboxConfig.trace is on
_JOB_START, _JOB_DONE, _RESULT_SENT = (_sandbox.stamp_names().index(n) for n in ("job_start", "job_done", "result_sent"))


# A job as the zygote compiled it: (program code, entry name or None to only exec the program,
# code of the argument tuple's expression or None for no arguments). A plain tuple: it is
# marshal'd, and building a class instance per job in the zygote cost page faults.
Job = tuple


def compile_job(kind: str, program: str, entry: str | None, args_source: str, seen: dict | None = None) -> Job:
    """Compile before forking the job's child, in the child the zygote forks to compile each
    batch (zygote.Compiler): a job's child then starts from bytecode (~110 fewer
    copy-on-write faults, about 0.3 ms on the dev VM) and a syntax error costs no job fork.
    compile() runs no code from its input; its time and memory grow with the source, which
    Sandbox caps at max_program_chars. seen, one batch's {(source, mode): code}, makes a source
    that repeats in the batch compile once (an induction check runs one program on many
    inputs; 20-130 us each for the bench's programs)."""
    code = _compile(program, "<program>", "exec", seen)
    if kind == "exec":
        return code, None, None
    source = args_source.strip()
    args = _compile(f"({source},)", "<input>", "eval", seen) if source else None
    return code, entry, args


def _compile(source: str, filename: str, mode: str, seen: dict | None):
    code = None if seen is None else seen.get((source, mode))
    if code is None:
        # Compile-time warnings (SyntaxWarning: "is" with a literal...) would go to the zygote's
        # buffered stderr, which every later child inherits and flushes as its own, and 3,000
        # of them filled the zygote's stderr pipe, which nobody reads, wedging it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = compile(source, filename, mode, dont_inherit=True)
        if seen is not None:
            seen[(source, mode)] = code
    return code


class _Output(io.TextIOWrapper):
    """A child's stdout or stderr: notes that it was written, so that a child that printed
    nothing skips the flushes at exit. Flushing two empty streams still writes into ~10 pages
    the child shares with the zygote (refcounts, the streams' state): skipping it took the
    flush stage of bench_sandbox.py --breakdown from 35 us and 12 copy-on-write faults to 15 us
    and 3, of a job's ~900 us on the 2-core fast-fork VM. A print costs ~0.1 us more."""

    def write(self, text):
        _written[0] = True
        return _text_write(self, text)


_text_write = io.TextIOWrapper.write
_written = [False]


def install_stdio() -> None:
    """Text streams over fds 1 and 2, created once in the zygote; after fork they write to the
    child's output pipes. Block-buffered: a print costs no syscall until 8 KiB or exit."""
    sys.stdout = _Output(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stderr = _Output(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    # Bound now: a job that swaps sys.stdout must not stop what it printed before from going out.
    _flushes[:] = [sys.stdout.flush, sys.stderr.flush]


_flushes: list = []


def describe(exc: BaseException) -> str:
    """"Name: message", each cut to a bound, as exact strs: a job's exception class may have a
    metaclass whose __name__ raises or lies, a __str__ returning a str subclass whose __len__
    or slicing lies, or a name of a million characters."""
    try:
        name = _type_name(_type(exc))
        if _len(name) > 200:
            name = name[:200] + "..."
    except _BaseException:
        name = "<exception>"
    try:
        message = _exact(_str(exc))
    except _BaseException:
        message = "<exception message could not be rendered>"
    if _len(message) > 2000:
        message = message[:2000] + f"... ({_len(message)} chars)"
    return f"{name}: {message}" if message else name


def _run(job: Job, max_value_chars: int) -> tuple[str, str | None, str | None]:
    program, entry_name, args_code = job
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        _exec(program, namespace)
        if entry_name is None:
            return "ok", None, None
        entry = namespace.get(entry_name)
        if entry is None:
            return "error", None, f"NameError: the program defines no {entry_name!r}"
        args = _eval(args_code, {"__builtins__": builtins}) if args_code is not None else ()
        value = _repr(entry(*args))
        if not _isinstance(value, _str):
            return "error", None, f"TypeError: __repr__ returned {_type_name(_type(value))}"
        value = _exact(value)  # a str subclass's __len__ could understate it
        if _len(value) > max_value_chars:
            return "output_limit", None, f"repr of the result has {_len(value)} chars, over max_value_chars={max_value_chars}"
        return "ok", value, None
    except MemoryError as exc:
        # Free what ran out before building the reply: the frames the traceback holds and
        # the program's globals.
        exc.__traceback__ = None
        namespace.clear()
        return "memory", None, describe(exc)
    except _BaseException as exc:
        return "error", None, describe(exc)


def shift_heap(draws: bytes) -> list:
    """Objects to hold while a job runs, so that its own objects take other addresses than in a
    child of the same zygote that holds none: per 16-byte size class of CPython's small-object
    allocator (objects, floats, then bytes objects of 35-499 bytes) a number of blocks drawn from
    `draws` (36 bytes), then one buffer of up to 128 KiB from malloc's heap (below its mmap
    threshold, so it moves what is allocated after it). A program whose result
    follows object addresses (a set of instances, hashed by id; a default repr) then gives
    another result in a determinism check's second run, which holds these, than in its first
    (same zygote state otherwise), and is refused instead of validated with an output that later
    runs do not repeat. ~1,000 allocations, ~320 KB on average, at most ~640 KB."""
    held = [[_object() for _ in range(draws[0] & 63)], [k + 0.5 for k in range(draws[1] & 63)]]
    held += [[_bytes(size) for _ in range(draws[k] & 63)] for k, size in enumerate(range(2, 482, 16), start=2)]
    held.append(_bytearray(int.from_bytes(draws[-3:], "little") & 0x1FFFF))
    return held


def serve(code: bytes, max_value_chars: int, heap_draws: bytes | None = None) -> None:
    """Run one job (its Job, marshal'd) and exit. Called in a hardened child; never returns.
    heap_draws: shift the job's object addresses first (shift_heap)."""
    _gc_enable()  # the zygote runs with it off
    held = shift_heap(heap_draws) if heap_draws is not None else None  # alive until _exit below
    _stamp(_JOB_START)
    try:
        outcome = _run(_loads(code), max_value_chars)
    except _BaseException as exc:
        outcome = ("memory" if _isinstance(exc, MemoryError) else "error", None, describe(exc))
    _stamp(_JOB_DONE)
    if _written[0]:
        for flush in _flushes:
            try:
                flush()
            except _BaseException:
                pass
    try:
        status, value, error = outcome
        _send(RESULT_FD, _status_index(status), value, error)
    except _BaseException:
        _exit(71)
    _stamp(_RESULT_SENT)
    _exit(0)
