"""A zygote: a small warm interpreter that forks one hardened child per job.

Started by Sandbox as a fresh `python -I` (its own random hash seed, no user site, no
PYTHON* variables, a scrubbed environment), never forked from the trainer: forking a
torch-sized process costs ~20 ms against ~1 ms for this one. It talks to the trainer over
one socket: a job frame in, a result frame out. The zygote is trusted code; it enforces the
wall clock (SIGKILL from outside the child), the output caps and the frame format."""

from __future__ import annotations

import fcntl
import gc
import importlib
import json
import marshal
import os
import random
import signal
import sys
import sysconfig
import time

from .. import _sandbox
from . import child
from .protocol import CHILD_STATUSES, parse_child_frame, read_frame, split_frames, write_frame

SYSCALL_NAMES = _sandbox.syscall_names()


def landlock_read_paths(workdir: str) -> list[str]:
    """Directories a child may read: the standard library (for lazy imports) and its workdir."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    paths.add(os.path.dirname(os.__file__))
    paths.add(workdir)
    return sorted(p for p in paths if os.path.isdir(p))


class Settings:
    """What the trainer decided at start, as the zygote uses it per child."""

    def __init__(self, raw: dict):
        self.workdir: str = raw["workdir"]
        self.address_space = raw["memory_mb"] << 20
        self.cpu_seconds: int = raw["cpu_seconds"]
        self.open_files: int = raw["open_files"]
        self.backend: str = raw["backend"]
        self.drop_to_uid: int = raw["drop_to_uid"]
        self.max_output_bytes: int = raw["max_output_bytes"]
        self.max_value_chars: int = raw["max_value_chars"]
        self.landlock_fd = _sandbox.landlock_ruleset(landlock_read_paths(self.workdir)) if raw["landlock"] else -1
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.result_cap = 4 * self.max_value_chars + 4096  # UTF-8 takes up to 4 bytes a char
        # A result pipe that holds any allowed result is read only after exit (one wakeup of
        # the zygote per job, not two); past the kernel's pipe-max-size it must be watched.
        capacity = 1 << (self.result_cap - 1).bit_length()
        with open("/proc/sys/fs/pipe-max-size") as f:
            self.watch_result = capacity > int(f.read())
        self.result_pipe_capacity = 0 if self.watch_result else capacity


KILLED = {0: None, 1: "timeout", 2: "output_limit"}


KILLED = {0: None, 1: "timeout", 2: "output_limit"}


def run_batch(timeout_s: float, jobs: list[bytes], s: Settings) -> list[bytes]:
    """Run a batch of jobs (each a marshal'd dict) one child at a time; one marshal'd reply
    per job, in order.

    Other jobs' data must not be reachable from a job: a frame walk from the child reaches
    this function's locals. So jobs and replies stay bytes, which a child zeroes in place
    (_sandbox.wipe) without touching the pages around them, and each job's objects live only
    inside run_one, gone before the next fork."""
    replies: list[bytes] = []
    for i in range(len(jobs)):
        replies.append(run_one(i, timeout_s, jobs, replies, s))
    return replies


def run_one(i: int, timeout_s: float, jobs: list[bytes], replies: list[bytes], s: Settings) -> bytes:
    start = time.monotonic()
    job = marshal.loads(jobs[i])
    try:
        compiled = child.compile_job(job["kind"], job["program"], job.get("entry"), job.get("args", ""))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        return marshal.dumps({"status": "error", "error": child.describe(exc), "duration_s": time.monotonic() - start})
    return marshal.dumps(run(compiled, timeout_s, s, (jobs, replies)))


def run_batch(timeout_s: float, jobs: list[bytes], s: Settings) -> list[bytes]:
    """Run a batch of jobs (each a marshal'd dict) one child at a time; one marshal'd reply
    per job, in order.

    Every page the zygote writes after a fork faults once (it is shared copy-on-write with the
    child), so compiling, which writes many pages, is done for the whole batch before the first
    fork (measured on the dev VM: ~100 more zygote faults per job when compiling per job).
    Other jobs must not be reachable from a job, and a frame walk from the child reaches this
    function's locals; so compiled jobs and replies are kept marshal'd, as bytes a child zeroes
    in place (_sandbox.wipe) after loading its own, without touching the pages around them."""
    compiled: list[bytes] = []
    kinds: list[str] = []
    for blob in jobs:
        code, kind = compile_blob(blob)
        compiled.append(code)
        kinds.append(kind)
    jobs.clear()
    replies: list[bytes] = []
    for i, kind in enumerate(kinds):
        replies.append(compiled[i] if kind == "failed" else
                       marshal.dumps(run(i, compiled, replies, kind == "call", timeout_s, s)))
    return replies


def compile_blob(blob: bytes) -> tuple[bytes, str]:
    """(marshal'd Job, "call" or "exec"), or (marshal'd error reply, "failed") when the source
    does not compile."""
    start = time.monotonic()
    job = marshal.loads(blob)
    try:
        compiled = child.compile_job(job["kind"], job["program"], job.get("entry"), job.get("args", ""))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        reply = {"status": "error", "error": child.describe(exc), "duration_s": time.monotonic() - start}
        return marshal.dumps(reply), "failed"
    return marshal.dumps(tuple(compiled)), job["kind"]


def run(i: int, compiled: list[bytes], replies: list[bytes], is_call: bool, timeout_s: float, s: Settings) -> dict:
    """Fork a child for compiled job i, harden it, run the job there, and judge the outcome.

    The job reaches the child through fork (no pipe, no parsing), and the zygote waits in C
    (_sandbox.supervise), touching almost no shared pages while the child runs."""
    # Unmarshalled and reseeded here, between children, rather than in the child: the child
    # would copy every page this touches (~106 faults there, measured on the dev VM, against a
    # few cheap write faults here). Every child still starts from fresh entropy.
    job = child.Job(*marshal.loads(compiled[i]))
    random.seed(int.from_bytes(os.urandom(16), "little"))
    result_r, result_w, out_r, out_w, err_r, err_w = _sandbox.child_pipes(s.result_pipe_capacity)
    pid = _sandbox.fork()
    if pid == 0:
        _sandbox.wipe(compiled)
        _sandbox.wipe(replies)
        try:
            _sandbox.harden(result_fd=result_w, stdout_fd=out_w, stderr_fd=err_w, devnull_fd=s.devnull,
                            workdir=s.workdir, address_space=s.address_space, cpu_seconds=s.cpu_seconds,
                            open_files=s.open_files, drop_to_uid=s.drop_to_uid, landlock_fd=s.landlock_fd)
        except BaseException as exc:
            try:
                _sandbox.send_result(child.RESULT_FD, CHILD_STATUSES.index("setup"), None, f"sandbox setup failed: {exc}")
            finally:
                os._exit(70)
        child.serve(job, s.max_value_chars)
    for fd in (result_w, out_w, err_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    killed, wait_status, cpu, duration, result, out, err = _sandbox.supervise(
        pid, pidfd, result_r, out_r, err_r, timeout_s, s.max_output_bytes, s.result_cap, s.watch_result)
    if killed == 0 and len(out) + len(err) > s.max_output_bytes:
        killed = 2  # it wrote past the cap just before exiting
    if len(result) > s.result_cap:
        killed = 2  # including a result pipe filled until the clock ran out
    reply = judge(wait_status, cpu, KILLED[killed], result, is_call, timeout_s, s)
    reply["duration_s"] = duration
    if out:
        reply["stdout"] = out.decode("utf-8", "replace")
    if err:
        reply["stderr"] = err.decode("utf-8", "replace")
    return reply


def syscall_name(nr: int) -> str:
    return f"{SYSCALL_NAMES[nr]} ({nr})" if nr in SYSCALL_NAMES else f"syscall {nr}"


def judge(wait_status: int, cpu: float, killed_for: str | None, result: bytes, is_call: bool,
          timeout_s: float, s: Settings) -> dict:
    """Turn what was observed about a child into its status. The child's own frame is believed
    only when the process exited normally right after sending exactly one well-formed frame."""
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
        if status == "violation" and error.isdigit():
            return {"status": "violation", "error": f"denied syscall: {syscall_name(int(error))}"}
        if status == "setup":
            return {"status": "error", "error": error}
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGSYS:
            return {"status": "violation", "error": "denied syscall (killed by SIGSYS, handler unavailable)"}
        if sig in (signal.SIGKILL, signal.SIGXCPU) and cpu >= s.cpu_seconds - 0.05:
            return {"status": "timeout", "error": f"used {cpu:.1f}s of CPU, the RLIMIT_CPU of {s.cpu_seconds}s"}
        if sig == signal.SIGKILL:
            return {"status": "memory", "error": "killed by SIGKILL (the kernel's out-of-memory killer)"}
        if sig == signal.SIGSEGV:
            return {"status": "error", "error": "crashed with SIGSEGV (often a C stack overflow from deep recursion)"}
        return {"status": "error", "error": f"killed by {signal.Signals(sig).name}"}
    code = os.WEXITSTATUS(wait_status)
    if rest or len(messages) != 1 or code != 0:
        if not messages and not rest:
            return {"status": "error", "error": f"exited with code {code} before returning a result"}
        return {"status": "error", "error": "the result channel was tampered with (extra, partial or missing frames)"}
    status, value, error = messages[0]
    if status in ("violation", "setup"):
        return {"status": "error", "error": "the result channel carried a malformed frame"}
    if status == "ok":
        return {"status": "ok", "value": value if is_call else None, "error": None}
    return {"status": status, "value": None, "error": error}


def main() -> None:
    # Above every descriptor a child is built from, so no child ever holds the trainer's socket
    # at a number it writes to.
    channel = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(int(sys.argv[1]))
    raw = json.loads(sys.argv[2])
    if len(os.listdir("/proc/self/task")) != 1:
        raise SystemExit("the zygote must be single-threaded: _sandbox.fork skips Python's at-fork handling")
    for name in raw["preload"]:
        importlib.import_module(name)
    child.install_stdio()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    settings = Settings(raw)
    _sandbox.confine_zygote(settings.backend)
    # Everything imported so far is shared copy-on-write with every child; moving it out of
    # the collector's reach keeps a child's GC from touching (and so copying) those pages.
    gc.freeze()
    # The zygote's own loop makes no reference cycles; a collection would only walk (and so
    # fault in) pages. Children turn the collector back on for the job.
    gc.disable()
    write_frame(channel, {"pid": os.getpid(), "vm_bytes": vm_bytes()})
    while (batch := read_frame(channel)) is not None:
        write_frame(channel, run_batch(*batch, settings))
    os._exit(0)  # skip interpreter teardown: nothing to flush, and fewer syscalls to allow


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
