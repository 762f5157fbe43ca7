"""What one job can learn of the jobs before it: nothing of their data in the memory its zygote
passes on (wiped freed memory, sources compiled in the zygote's compiler process), no code
objects built from bytes, and the compiler's own recovery when it is lost."""

import os
import secrets
import signal
import sys
import threading
import time

import pytest
from helpers import comm, descendants_of

from fastazr.sandbox import Sandbox


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as box:
        yield box


# a fake bytearray over the whole address space, reached with an out-of-range LOAD_CONST in
# bytecode the job wrote itself; from there it scans the memory around its frames, which it
# inherited from the zygote, for what earlier jobs printed or returned (Python 3.11's opcodes)
_MEMORY_READER = r"""
def f():
    import re, sys
    fake = (1).to_bytes(8, "little") + id(bytearray).to_bytes(8, "little") + (2**62).to_bytes(8, "little") \
        + (2**62).to_bytes(8, "little") + bytes(24)
    ptr = (id(fake) + 32).to_bytes(8, "little")
    g = lambda: 0
    consts = g.__code__.co_consts
    index = (id(ptr) + 32 - (id(consts) + 24)) // 8
    b = (index if 0 < index < 2**31 else 0).to_bytes(4, "big")  # ptr below consts: no read, same refusal
    g.__code__ = g.__code__.replace(co_code=bytes([151, 0, 144, b[0], 144, b[1], 144, b[2], 100, b[3], 83, 0]))
    mem, frame, hits = g(), sys._getframe(), set()
    while frame is not None:
        base = id(frame) & ~0x3FFF
        hits |= set(re.findall(rb"EARLIER[A-Z]+", bytes(mem[base:base + 0x4000])))
        frame = frame.f_back
    return sorted(hits)
"""


def test_jobs_compile_in_the_zygotes_compiler_which_is_replaced_when_lost():
    """Sources compile in one long-lived child of each zygote (zygote.Compiler), never in the
    zygote; a compiler killed between calls is replaced and the next call's jobs still run."""
    with Sandbox(workers=1) as box:
        assert box.call_many([("def f():\n    return 1\n", "f", "")])[0].value == "1"
        zygote = box._zygotes[0].process.pid
        compilers = [p for p in descendants_of(zygote) if comm(p) == "fastazr-compile"]
        assert len(compilers) == 1
        os.kill(compilers[0], signal.SIGKILL)
        results = box.call_many([(f"def f():\n    return {k}\n", "f", "") for k in range(5)])
        assert [r.value for r in results] == [str(k) for k in range(5)], results
        again = [p for p in descendants_of(zygote) if comm(p) == "fastazr-compile"]
        assert len(again) == 1 and again != compilers
    deadline = time.monotonic() + 5.0  # SIGKILL from the zygote's death is delivered, not awaited
    while comm(again[0]) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert comm(compilers[0]) is None and comm(again[0]) is None, "a compiler outlived its zygote"


def test_a_compiler_lost_mid_batch_costs_no_job_its_result():
    """The compiler killed while it compiles a batch (a ~1 MB source keeps it busy for ~0.4 s):
    the zygote compiles the batch's jobs again one at a time, and each gets its result."""
    big = "def f():\n    return 7\n" + "".join(f"v{i} = {i}\n" for i in range(70_000))
    jobs = [(f"def f():\n    return {k}\n", "f", "") for k in range(3)] + [(big, "f", "")]
    with Sandbox(workers=1, max_program_chars=2_000_000, timeout_s=5.0) as box:
        box.call_many(jobs[:1])
        zygote = box._zygotes[0].process.pid
        compiler, = (p for p in descendants_of(zygote) if comm(p) == "fastazr-compile")
        killed = []

        def kill_when_busy():
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                try:
                    with open(f"/proc/{compiler}/stat") as f:
                        if f.read().rpartition(")")[2].split()[0] == "R":
                            os.kill(compiler, signal.SIGKILL)
                            killed.append(True)
                            return
                except OSError:
                    return
                time.sleep(0.001)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        results = box.call_many(jobs)
        killer.join()
    assert killed, "the compiler never ran: nothing was tested"
    assert [(r.status, r.value) for r in results] == [("ok", "0"), ("ok", "1"), ("ok", "2"), ("ok", "7")], results


# Scans every private writable mapping the child has (the zygote's heap, arenas and stack,
# inherited) for needles given in two halves: the job never holds a whole needle itself, so
# whatever it finds came from the zygote. ctypes loads only where Landlock is off.
_MEMORY_SCANNER = r"""
import ctypes
def f(needles):
    found = set()
    with open('/proc/self/maps') as maps:
        lines = maps.read().splitlines()
    for line in lines:
        fields = line.split()
        if not fields[1].startswith('rw') or len(fields) > 5 and fields[5].startswith('/'):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split('-'))
        memory = ctypes.string_at(lo, hi - lo)
        for name, head, tail in needles:
            at = memory.find(head)
            while at >= 0:
                if memory[at + len(head):at + len(head) + len(tail)] == tail:
                    found.add((name, fields[-1] if len(fields) > 5 else 'anonymous'))
                at = memory.find(head, at + 1)
    return sorted(found)
"""


@pytest.mark.filterwarnings("ignore:fastazr sandbox")
@pytest.mark.parametrize("huge_arenas", [True, False])
def test_freed_job_data_never_reaches_a_child(huge_arenas):
    """Found in review: the zygote's Python compiles every job's source and decodes its outputs,
    and CPython keeps freed blocks as they were, so each later child inherited earlier jobs'
    programs, printed text and values, readable to a job with ctypes (Landlock off) or forged
    bytecode. The zygote now wipes what it frees (csrc/sandbox/scrub.c). Earlier jobs run in
    the scanner's own batch and in batches before it, in the same zygote; each plants one
    needle in its source, others only in what it prints, writes to stderr, raises or returns."""
    marks = {name: secrets.token_hex(16) for name in ("source", "stdout", "stderr", "value", "error", "exec", "long", "over")}
    hidden = [repr(marks[name][::-1]) for name in ("stdout", "stderr", "value")]
    planted = [
        (f"def f():\n    return {marks['source']!r}[:4]\n", "f", ""),
        ("import sys\ndef f(out, err, value):\n    print(out[::-1])\n    print(err[::-1], file=sys.stderr)\n"
         "    return value[::-1]\n", "f", ", ".join(hidden)),
        ("def f(m):\n    raise ValueError(m[::-1])\n", "f", repr(marks["error"][::-1])),
        # through the zygote's growing output buffer, and past the cap into its discard buffer
        ("def f(m):\n    print('.' * 50000 + m[::-1])\n", "f", repr(marks["long"][::-1])),
        ("def f(m):\n    print((m[::-1] + '.') * 4000)\n", "f", repr(marks["over"][::-1])),
    ]
    needles = repr([(name, text[:16].encode(), text[16:].encode()) for name, text in marks.items()])
    scan = (_MEMORY_SCANNER, "f", needles)
    with Sandbox(workers=1, memory_mb=1024, max_output_bytes=100_000, landlock="off", drop_privileges="off",
                 huge_arenas=huge_arenas) as box:
        earlier = box.call_many(planted)
        assert [r.status for r in earlier] == ["ok", "ok", "error", "ok", "output_limit"], earlier
        assert (earlier[1].stdout, earlier[1].stderr, earlier[1].value) == (
            marks["stdout"] + "\n", marks["stderr"] + "\n", repr(marks["value"]))
        assert marks["error"] in earlier[2].error
        assert box.exec_many([f"print({marks['exec'][::-1]!r}[::-1])"])[0].stdout == marks["exec"] + "\n"
        later = box.call_many([scan])[0]
        same_batch = box.call_many(planted + [scan] + planted)[-len(planted) - 1]
    for result in (later, same_batch):
        assert result.status == "ok", (result.status, result.error)
        assert result.value == "[]", f"earlier jobs' data found in a child's memory: {result.value}"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the reader's bytecode is Python 3.11's")
def test_jobs_cannot_build_code_objects(sb):
    """Found in review: a job that writes its own bytecode can read any address. Zygotes, and so
    their children, refuse code objects a job builds (an audit hook in C): the reader fails
    before it reads. Defence in depth beside the wiping of freed zygote memory (the test
    above): marshal.loads is still allowed because imports need it. Compiling source still
    works."""
    sb.call_many([("def f():\n    return 'EARLIERVALUE' * 10\n", "f", "")] * 3)
    sb.exec_many(["print('EARLIEROUTPUT' * 20)"] * 3)
    reader, = sb.call_many([(_MEMORY_READER, "f", "")])
    assert reader.status == "error" and "code.__new__ is refused" in reader.error, (reader.status, reader.value)
    builder = ("import types\ndef f():\n    c = f.__code__\n    return types.CodeType(*[getattr(c, 'co_' + n) for n in "
               "('argcount', 'posonlyargcount', 'kwonlyargcount', 'nlocals', 'stacksize', 'flags', 'code', "
               "'consts', 'names', 'varnames', 'filename', 'name', 'qualname', 'firstlineno', 'linetable', "
               "'exceptiontable', 'freevars', 'cellvars')])\n")
    built, = sb.call_many([(builder, "f", "")])
    assert built.status == "error" and "code.__new__ is refused" in built.error, (built.status, built.error)
    ordinary = ("import collections, dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\n"
                "def f():\n    T = collections.namedtuple('T', 'a b')\n    ns = {}\n"
                "    exec(compile('y = 2', '<s>', 'exec'), ns)\n    return (P(1).x, T(1, 2).b, ns['y'])\n")
    assert [(r.status, r.value) for r in sb.call_many([(ordinary, "f", "")])] == [("ok", "(1, 2, 2)")]
