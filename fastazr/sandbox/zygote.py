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
import os
import select
import signal
import sys
import sysconfig
import time

from .. import _sandbox
from . import child
from .protocol import read_frame, split_frames, write_frame

CHILD_STATUSES = ("ok", "error", "memory", "output_limit", "violation")
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
        self.prefork: bool = raw["prefork"]
        self.landlock_fd = _sandbox.landlock_ruleset(landlock_read_paths(self.workdir)) if raw["landlock"] else -1
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


class Child:
    """A forked, hardened child blocked on reading its job."""

    def __init__(self, s: Settings):
        job_r, self.job_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                _sandbox.harden(job_fd=job_r, result_fd=result_w, stdout_fd=out_w, stderr_fd=err_w,
                                devnull_fd=s.devnull, workdir=s.workdir, address_space=s.address_space,
                                cpu_seconds=s.cpu_seconds, open_files=s.open_files,
                                drop_to_uid=s.drop_to_uid, landlock_fd=s.landlock_fd, backend=s.backend)
            except BaseException as exc:
                try:
                    write_frame(child.RESULT_FD, {"status": "setup", "error": f"sandbox setup failed: {exc}"})
                finally:
                    os._exit(70)
            child.serve()
        for fd in (job_r, result_w, out_w, err_w):
            os.close(fd)
        self.pidfd = os.pidfd_open(self.pid)

    def run(self, job: dict, s: Settings) -> dict:
        """Hand the job over, watch the child until it exits or its time is up, and judge."""
        start = time.monotonic()
        deadline = start + job["timeout_s"]
        payload = json.dumps({"kind": job["kind"], "program": job["program"], "entry": job.get("entry"),
                              "args": job.get("args", ""), "max_value_chars": s.max_value_chars}).encode()
        try:
            write_all(self.job_w, payload)
        except BrokenPipeError:
            pass  # the child is gone already; its exit status says why
        os.close(self.job_w)

        buffers = {self.result_r: bytearray(), self.out_r: bytearray(), self.err_r: bytearray()}
        poller = select.poll()
        for fd in (*buffers, self.pidfd):
            poller.register(fd, select.POLLIN)
        output_cap = s.max_output_bytes
        result_cap = s.max_value_chars * 6 + 4096  # JSON may escape each char to \\uXXXX
        exited = killed_for = None
        while exited is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_for = "timeout"
                break
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self.pidfd:
                    exited = True
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    continue
                buffers[fd] += data
            if len(buffers[self.out_r]) + len(buffers[self.err_r]) > output_cap or len(buffers[self.result_r]) > result_cap:
                killed_for = "output_limit"
                break
        if killed_for:
            os.kill(self.pid, signal.SIGKILL)
        _, wait_status, usage = os.wait4(self.pid, 0)
        duration = time.monotonic() - start
        if not killed_for:
            drain(buffers)
        for fd in (*buffers, self.pidfd):
            os.close(fd)
        reply = judge(wait_status, usage, killed_for, buffers[self.result_r], job, s)
        reply["duration_s"] = duration
        reply["stdout"] = buffers[self.out_r].decode("utf-8", "replace")
        reply["stderr"] = buffers[self.err_r].decode("utf-8", "replace")
        return reply


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def drain(buffers: dict) -> None:
    """Read what a dead child left in its pipes (it holds no write end any more)."""
    for fd, buf in buffers.items():
        while chunk := os.read(fd, 1 << 16):
            buf += chunk


def syscall_name(nr: int) -> str:
    return f"{SYSCALL_NAMES[nr]} ({nr})" if nr in SYSCALL_NAMES else f"syscall {nr}"


def judge(wait_status: int, usage, killed_for: str | None, result: bytearray, job: dict, s: Settings) -> dict:
    """Turn what was observed about a child into its status. The child's own frame is believed
    only when the process exited normally right after sending exactly one well-formed frame."""
    if killed_for == "timeout":
        return {"status": "timeout", "error": f"ran past timeout_s={job['timeout_s']:g}s and was killed"}
    if killed_for == "output_limit":
        return {"status": "output_limit",
                "error": f"wrote more than max_output_bytes={s.max_output_bytes} to stdout/stderr"}
    frames, rest = split_frames(bytes(result))
    messages = []
    for body in frames:
        try:
            message = json.loads(body)
        except ValueError:
            return {"status": "error", "error": "the result channel carried a malformed frame"}
        if not isinstance(message, dict):
            return {"status": "error", "error": "the result channel carried a malformed frame"}
        messages.append(message)
    for message in messages:
        if message.get("status") == "violation" and isinstance(message.get("syscall"), int):
            return {"status": "violation", "error": f"denied syscall: {syscall_name(message['syscall'])}"}
        if message.get("status") == "setup":
            return {"status": "error", "error": str(message.get("error"))}
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        cpu = usage.ru_utime + usage.ru_stime
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
    message = messages[0]
    status = message.get("status")
    value, error = message.get("value"), message.get("error")
    if status not in CHILD_STATUSES or not isinstance(value, (str, type(None))) or not isinstance(error, (str, type(None))):
        return {"status": "error", "error": "the result channel carried a malformed frame"}
    if status == "ok" and job["kind"] == "call" and value is None:
        return {"status": "error", "error": "the result channel carried a malformed frame"}
    return {"status": status, "value": value if status == "ok" else None, "error": error}


def main() -> None:
    # Above every descriptor a child is built from, so no child ever holds the trainer's socket
    # at a number it writes to.
    channel = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(int(sys.argv[1]))
    raw = json.loads(sys.argv[2])
    for name in raw["preload"]:
        importlib.import_module(name)
    child.install_stdio()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    settings = Settings(raw)
    # Everything imported so far is shared copy-on-write with every child; moving it out of
    # the collector's reach keeps a child's GC from touching (and so copying) those pages.
    gc.freeze()
    write_frame(channel, {"pid": os.getpid(), "vm_bytes": vm_bytes()})
    ready = Child(settings) if settings.prefork else None
    while (job := read_frame(channel)) is not None:
        worker = ready or Child(settings)
        reply = worker.run(job, settings)
        write_frame(channel, reply)
        ready = Child(settings) if settings.prefork else None
    if ready is not None:
        os.kill(ready.pid, signal.SIGKILL)
        os.waitpid(ready.pid, 0)


def vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
