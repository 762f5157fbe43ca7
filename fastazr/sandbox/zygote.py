"""A zygote: a small warm interpreter that forks one hardened child per job.

Started by Sandbox as a fresh `python -s -S` (the hash seed Sandbox gives it, no site hooks,
no other PYTHON* variables: a scrubbed environment), never forked from the trainer: forking a
torch-sized process costs ~20 ms against ~1 ms for this one. It talks to the trainer over
one socket: a batch frame in, a reply frame out. The zygote is trusted code; it enforces the
wall clock (SIGKILL from outside the child), the output caps and the frame format.

Cost model, measured on the 2-core dev VM: after each fork every page the zygote or the child
writes faults once (both share it copy-on-write), so the work per job is arranged to touch as
few pages as it can: compiling happens once per batch, the fork-to-reap path is C
(_sandbox.spawn), and the child's own Python is the job and little else.

No job's data stays in the zygote's memory, which every later child inherits: sources compile
in the zygote's compiler process (Compiler), jobs' children unmarshal their own code, and what
the zygote frees is wiped (csrc/sandbox/scrub.c; docs/sandbox.md)."""

from __future__ import annotations

import gc
import importlib
import marshal
import os
import random
import signal
import sys
import time

from .. import _sandbox
from . import child
from .protocol import parse_child_frame, read_frame, split_frames, write_frame

SYSCALL_NAMES = _sandbox.syscall_names()
stamp = _sandbox.stamp  # a no-op unless SandboxConfig.trace is on
JOB_ENTER, JOB_LEAVE = (_sandbox.stamp_names().index(name) for name in ("job_enter", "job_leave"))
KILLED = {0: None, 1: "timeout", 2: "output_limit"}
# Compiled jobs a zygote keeps across batches, found by the job's own bytes (its kind and
# sources): a program checked again in a later call (validated, then run on inputs, then
# deduced from) compiles once, and the bench's repeated programs not once a batch (~40 us a
# job there on the 2-core VM). Past this many bytes (~3,000 AZR-sized jobs; a 16-core node's
# 32 zygotes could hold 512 MiB) the cache starts over.
CODE_CACHE_BYTES = 16 << 20
CACHED_KINDS = {ord("c"): "call", ord("e"): "exec"}
# Source bytes a compiler takes before it is replaced: from Python 3.12 the names it interns are
# immortal, so its memory only grows (a review measured 38 -> 139 MB over 1.3M distinct names).
# A replacement costs ~3 ms; 64 MiB of AZR-sized programs is ~100,000 of them.
COMPILER_SOURCE_BYTES = 64 << 20
# random's C-level seeding from the kernel's entropy, without the Python-level Random.seed.
reseed = super(random.Random, random._inst).seed


class Settings:
    """What the trainer decided at start, as the zygote uses it per child."""

    def __init__(self, raw: dict):
        self.max_output_bytes: int = raw["max_output_bytes"]
        self.max_value_chars: int = raw["max_value_chars"]
        self.result_cap = 4 * self.max_value_chars + 4096  # UTF-8 takes up to 4 bytes a char
        # A result pipe that holds any allowed result is read only after exit (one wakeup of
        # the zygote per job, not two); past the kernel's pipe-max-size it must be watched.
        capacity = 1 << (self.result_cap - 1).bit_length()
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_capacity = capacity if capacity <= int(f.read()) else 0
        landlock_fd = _sandbox.landlock_ruleset(raw["landlock_paths"]) if raw["landlock_paths"] else -1
        _sandbox.configure(devnull_fd=os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), workdir=raw["workdir"],
                           address_space=raw["memory_mb"] << 20,
                           open_files=raw["open_files"], drop_to_uid=raw["drop_to_uid"], landlock_fd=landlock_fd,
                           output_cap=self.max_output_bytes, result_cap=self.result_cap,
                           result_pipe_capacity=pipe_capacity, trace=raw["trace"])
        self.trace: bool = raw["trace"]
        # A determinism check's second run (hash-seed group 1) also shifts its objects' addresses.
        self.shift_heap: bool = raw["shift_heap"]
        self.compiler = Compiler()
        self.code_cache = _sandbox.Stash()  # job bytes -> kind's first letter + marshal'd Job


def run_batch(timeout_s: float, jobs: list[bytes], s: Settings) -> list[bytes]:
    """Run a batch of jobs (each a marshal'd dict) one child at a time; one marshal'd reply
    per job, in order.

    Work that writes many pages is done once per batch, not once per fork: compiling (in the
    Compiler) before the first child, judging and encoding replies after the last. No job may
    reach another's program or output, and a child can walk the stack it inherited (sys._getframe().f_back...): so compiled jobs and outputs wait in a
    Stash, memory no child inherits, and a job's own objects live only in run_one's frame.
    What the frames above hold when a child forks is the empty `jobs` list, the Stashes, job
    kinds and small numbers."""
    cpu_seconds = int(timeout_s) + 2  # RLIMIT_CPU backs the wall clock up
    # With SandboxConfig.trace, each job's compile time (ns), kept where no child can read it.
    compile_times = _sandbox.Stash() if s.trace else None
    if s.code_cache.nbytes > CODE_CACHE_BYTES:
        s.code_cache = _sandbox.Stash()
    compiled, kinds = compile_batch(jobs, s, compile_times)
    outputs = _sandbox.Stash()
    # The collector stays off in the zygote, yet counts every container it allocates; a child
    # whose count passed the threshold (700) collected the zygote's young objects on its first
    # allocation, writing (so copying) every page they sit on: 98 faults in a trivial job
    # instead of 41 (2-core dev VM, preload=()). Frozen, they are out of its reach and the
    # count is 0; freezing is O(1), it links lists.
    gc.freeze()
    outcomes = [None if kind == "failed" else run_one(i, compiled, outputs, timeout_s, cpu_seconds, s)
                for i, kind in enumerate(kinds)]
    return [compiled.get(i) if kind == "failed" else
            marshal.dumps(judge_outcome(outcomes[i], outputs, kind == "call", timeout_s, cpu_seconds, s,
                                        None if compile_times is None else compile_times.get(i)))
            for i, kind in enumerate(kinds)]


def compile_batch(jobs: list[bytes], s: Settings, compile_times=None):
    """(Stash of compiled jobs or error replies, kinds), emptying `jobs`. Jobs compiled before
    come from s.code_cache (see CODE_CACHE_BYTES); the rest compile in a child
    (Compiler). compile_times, a Stash, gets each job's compile time in ns (8 bytes,
    little-endian; 0 for a cached job)."""
    found = [s.code_cache.find(blob) for blob in jobs]
    missing = [blob for blob, hit in zip(jobs, found) if hit is None]
    fresh = iter(s.compiler.compile(missing) if missing else ())
    compiled = _sandbox.Stash()
    kinds = []
    for blob, hit in zip(jobs, found):
        if hit is not None:
            code, kind, ns = hit[1:], CACHED_KINDS[hit[0]], 0
        else:
            kind, code, ns = next(fresh)
            if kind != "failed":
                s.code_cache.put(blob, kind[0].encode() + code)
        if compile_times is not None:
            compile_times.append(ns.to_bytes(8, "little"))
        compiled.append(code)
        kinds.append(kind)
    jobs.clear()
    return compiled, kinds


class Compiler:
    """A child of the zygote that compiles jobs' sources for it, so that no job's source, name or
    constant is ever an object in the zygote: compiling interns a program's names and name-like
    string constants, which from Python 3.12 are immortal, out of reach of the wiping of freed
    memory (scrub.c), and every later child would inherit them. No child is forked from the
    compiler and it runs no job, so what it keeps reaches no job. Long-lived: a fork per batch
    cost 0.35-0.7 ms a job on the 2-core VM (batches shrink to a few jobs as a call drains);
    replaced after COMPILER_SOURCE_BYTES and after it dies. It has the zygote's memory, no cap
    of its own (a batch of 32 sources of 1M characters needs more than a job's memory_mb); a
    source that kills it (crashing the compiler) fails its own job, not the batch or the zygote."""

    def __init__(self):
        self.pid = 0
        self.source_bytes = 0
    def compile(self, blobs: list[bytes]) -> list[tuple[str, bytes, int]]:
        """(kind, marshal'd Job or error reply, compile ns) for each blob (see compile_blob). A
        compiler lost mid-batch is replaced and the batch's jobs compiled one at a time, each
        by a compiler of its own if need be: only a job that kills it alone fails."""
        if self.pid and self.source_bytes > COMPILER_SOURCE_BYTES:
            self.stop()
        results, _ = self.send(blobs)
        if results is not None:
            return results
        alone = []
        for blob in blobs:
            one, why = self.send([blob])
            alone.append(one[0] if one is not None else (
                "failed", compile_failure(f"the compiler process died compiling this job ({why})"), 0))
        return alone

    def send(self, blobs: list[bytes]) -> tuple[list | None, str]:
        """(results, "") or, when the compiler was lost, (None, why), the compiler stopped."""
        try:
            if not self.pid:
                self.start()
            self.source_bytes += sum(map(len, blobs))
            write_frame(self.to_child, blobs)
            results = read_frame(self.from_child)
        except OSError as exc:
            results, why = None, os.strerror(exc.errno)
        except (EOFError, ValueError, TypeError):  # a reply cut short by the compiler's death
            results, why = None, "its reply was cut short"
        else:
            why = "it closed its channel"
        if results is not None and len(results) == len(blobs):
            return results, ""
        if self.pid:
            why = self.stop() or why
        return None, why

    def start(self) -> None:
        down, up = os.pipe(), os.pipe()
        try:
            pid = _sandbox.fork_compiler()
        except OSError:
            for fd in down + up:
                os.close(fd)
            raise
        if pid == 0:
            status = 1  # an exception here: the zygote reports the exit status
            try:
                # stdin, stdout and stderr and the two pipes: not the trainer's channel, not
                # the Landlock ruleset
                os.closerange(3, min(down[0], up[1]))
                os.closerange(min(down[0], up[1]) + 1, max(down[0], up[1]))
                os.closerange(max(down[0], up[1]) + 1, 1 << 20)
                while (blobs := read_frame(down[0])) is not None:
                    seen = {}
                    write_frame(up[1], [compile_blob(blob, seen) for blob in blobs])
                status = 0
            finally:
                os._exit(status)
        os.close(down[0])
        os.close(up[1])
        self.pid, self.to_child, self.from_child, self.source_bytes = pid, down[1], up[0], 0

    def stop(self) -> str | None:
        """Close its channel and reap it; how it ended, if not by exiting cleanly or by this."""
        os.close(self.to_child)
        os.close(self.from_child)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) != signal.SIGKILL:
            return f"killed by signal {os.WTERMSIG(status)}"
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
            return f"exit status {os.WEXITSTATUS(status)}"
        return None


def compile_failure(error: str) -> bytes:
    return marshal.dumps({"status": "error", "error": error, "duration_s": 0.0})


def run_one(i: int, compiled, outputs, timeout_s: float, cpu_seconds: int, s: Settings) -> tuple:
    """Run job i in a fresh hardened child. Returns (killed, wait status, CPU seconds,
    duration, and the Stash indices of its result frame, stdout, stderr and stamps; the
    last is -1 unless SandboxConfig.trace is on)."""
    stamp(JOB_ENTER)
    # Unmarshalled in the child, not here: code objects intern their names (immortal from
    # Python 3.12: see Compiler). Reseeded here, between children: each child starts
    # from fresh entropy, though _sandbox.spawn skips the at-fork hook that reseeds random.
    code = compiled.get(i)
    reseed()
    # drawn here: a child may not ask the kernel for entropy
    heap_draws = random.randbytes(36) if s.shift_heap else None
    try:
        outcome = _sandbox.spawn(timeout_s, cpu_seconds)
    except OSError as exc:  # no fork, pipe or pidfd to be had right now
        return None, exc.errno
    if outcome is None:
        child.serve(code, s.max_value_chars, heap_draws)
    killed, wait_status, cpu, duration, result, out, err = outcome
    where = outputs.append(result), outputs.append(out), outputs.append(err)
    stamp(JOB_LEAVE)
    stamps = outputs.append(marshal.dumps(_sandbox.trace_take())) if s.trace else -1
    return killed, wait_status, cpu, duration, *where, stamps


def compile_blob(blob: bytes, seen: dict | None = None) -> tuple[str, bytes, int]:
    """(kind, marshal'd Job, compile ns) with kind "call" or "exec", or ("failed", marshal'd
    error reply, ns) when the source does not compile. seen: see child.compile_job. Runs in
    the compiler (Compiler)."""
    start = time.monotonic_ns()
    job = marshal.loads(blob)
    try:
        compiled = child.compile_job(job["kind"], job["program"], job.get("entry"), job.get("args", ""), seen)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        ns = time.monotonic_ns() - start
        return "failed", marshal.dumps({"status": "error", "error": child.describe(exc), "duration_s": ns / 1e9}), ns
    return job["kind"], marshal.dumps(compiled), time.monotonic_ns() - start


def judge_outcome(outcome: tuple, outputs, is_call: bool, timeout_s: float, cpu_seconds: int,
                  s: Settings, compile_time: bytes | None = None) -> dict:
    start = time.monotonic_ns()
    if outcome[0] is None:
        return {"status": "error", "error": f"could not start a child: {os.strerror(outcome[1])}"}
    killed, wait_status, cpu, duration, *where, stamps = outcome
    result, out, err = (outputs.get(k) for k in where)
    if killed == 0 and len(out) + len(err) > s.max_output_bytes:
        killed = 2  # it wrote past the cap just before exiting
    if len(result) > s.result_cap:
        killed = 2  # including a result pipe filled until the clock ran out
    try:
        reply = judge(wait_status, cpu, KILLED[killed], result, is_call, timeout_s, cpu_seconds, s)
    except Exception as exc:  # the zygote must outlive any child, whatever it sent
        reply = {"status": "error", "error": f"the child's outcome could not be judged: {type(exc).__name__}"}
    reply["duration_s"] = duration
    if out:
        reply["stdout"] = out.decode("utf-8", "replace")
    if err:
        reply["stderr"] = err.decode("utf-8", "replace")
    if stamps >= 0:
        ns, faults = marshal.loads(outputs.get(stamps))
        if all(ns):  # every stamp taken: a job killed, or stopped by its filter, skipped some
            # the raw stamps, then the compile and judge times: fastazr/sandbox/trace.py reads them
            reply["trace"] = ns, faults, int.from_bytes(compile_time, "little"), time.monotonic_ns() - start
    return reply


def syscall_name(nr: int) -> str:
    return f"{SYSCALL_NAMES[nr]} ({nr})" if nr in SYSCALL_NAMES else f"syscall {nr}"


def judge(wait_status: int, cpu: float, killed_for: str | None, result: bytes, is_call: bool,
          timeout_s: float, cpu_seconds: int, s: Settings) -> dict:
    """Turn what was observed about a child into its status. A violation or setup report is
    believed wherever it appears (it can only make the job fail); an "ok", "error", "memory" or
    "output_limit" result only when the process exited normally right after sending exactly
    one well-formed frame."""
    if killed_for == "timeout":
        return {"status": "timeout", "error": f"ran past timeout_s={timeout_s:g}s and was killed"}
    if killed_for == "output_limit":
        return {"status": "output_limit",
                "error": f"wrote more than max_output_bytes={s.max_output_bytes} to stdout/stderr"}
    frames, rest = split_frames(result)
    messages = [parse_child_frame(body) for body in frames]
    if None in messages:
        return {"status": "error", "error": "the result channel carried a malformed frame"}
    for status, _, error in messages:
        if status == "violation" and error.isascii() and error.isdigit() and len(error) < 6:
            return {"status": "violation", "error": f"denied syscall: {syscall_name(int(error))}"}
        if status == "setup":
            return {"status": "error", "error": error}
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGSYS:
            return {"status": "violation", "error": "denied syscall (killed by SIGSYS, handler unavailable)"}
        if sig in (signal.SIGKILL, signal.SIGXCPU) and cpu >= cpu_seconds - 0.05:
            return {"status": "timeout", "error": f"used {cpu:.1f}s of CPU, the RLIMIT_CPU of {cpu_seconds}s"}
        if sig == signal.SIGKILL:
            return {"status": "memory", "error": "killed by SIGKILL (the kernel's out-of-memory killer)"}
        if sig == signal.SIGSEGV:
            return {"status": "error", "error": "crashed with SIGSEGV (often a C stack overflow from deep recursion)"}
        return {"status": "error", "error": f"killed by signal {sig} ({signal.strsignal(sig) or 'unknown'})"}
    code = os.WEXITSTATUS(wait_status)
    if rest or len(messages) != 1 or code != 0:
        if not messages and not rest:
            return {"status": "error", "error": f"exited with code {code} before returning a result"}
        return {"status": "error", "error": "the result channel was tampered with (extra, partial or missing frames)"}
    status, value, error = messages[0]
    if status == "violation":
        return {"status": "error", "error": "the result channel carried a malformed frame"}
    if status == "ok":
        return {"status": "ok", "value": value if is_call else None, "error": None}
    return {"status": status, "value": None, "error": error}


def main() -> None:
    channel = int(sys.argv[1])  # above every descriptor a child is built from (Zygote in pool.py)
    raw = marshal.loads(bytes.fromhex(sys.argv[2]))
    if len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("the zygote must be single-threaded: _sandbox.spawn skips Python's at-fork handling")
    os.environ.clear()  # unsets the C environment too: children start with none at all
    if raw["cpu"] is not None:
        os.sched_setaffinity(0, {raw["cpu"]})
    for name in raw["preload"]:
        importlib.import_module(name)
    child.install_stdio()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    settings = Settings(raw)
    _sandbox.confine_zygote(raw["backend"])
    # Installed once here, children inherit it: no job may build code objects (module.c). The
    # zygote builds none itself (compile() and marshal raise other events).
    _sandbox.refuse_code_objects()
    # Everything imported so far is shared copy-on-write with every child; moving it out of
    # the collector's reach keeps a child's GC from touching (and so copying) those pages.
    gc.freeze()
    # The zygote's own loop makes no reference cycles; a collection would only walk (and so
    # fault in) pages. Children turn the collector back on for the job.
    gc.disable()
    # From here on, what the zygote frees is wiped (scrub.c): it holds every job's compiled
    # code and outputs for a while, and later children inherit its freed memory. Collected
    # first, so that the free lists hold no object from before the hook, which it would not wipe.
    gc.collect()
    _sandbox.wipe_freed_memory()
    write_frame(channel, {"pid": os.getpid(), "vm_bytes": vm_bytes(), "huge_arena_bytes": _sandbox.huge_arena_bytes(),
                          "huge_page_bytes": huge_page_bytes(os.getpid())})
    while (batch := read_frame(channel)) is not None:
        write_frame(channel, run_batch(*batch, settings))
        # Free lists keep freed objects unwiped (floats, tuples, small dict keys with their
        # hashes); a full collection empties them into the wiping free.
        gc.collect()
    if settings.compiler.pid:
        settings.compiler.stop()  # reaped here, not left to its death signal and to init
    _sandbox.reap()
    os._exit(0)  # skip interpreter teardown: nothing to flush, and fewer syscalls to allow


def huge_page_bytes(pid: int) -> int:
    """Bytes of process pid's memory in transparent huge pages (what the kernel granted of the
    arenas' MADV_HUGEPAGE chunks; 0 where THP is off or none was free)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def vm_bytes() -> int:
    """The address space a child inherits: every mapping but those marked MADV_DONTFORK
    (VmFlags "dc": the stashes, the wiping table, the output regions, which a child never
    maps and which its memory limit need not hold)."""
    total = size = 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping's first line: start-end perms ...
                start, end = head.split("-")
                size = int(end, 16) - int(start, 16)
            elif head == "VmFlags:" and "dc" not in line.split()[1:]:
                total += size
    return total


if __name__ == "__main__":
    main()
