"""Sandbox: a pool of zygotes, each running one untrusted job at a time in a fresh child.

    with Sandbox(workers=8, timeout_s=2.0, memory_mb=512) as sb:
        results = sb.call_many([(program, "f", "[1, 2], 3")])
        printed = sb.exec_many(["print(sum(range(10)))"])

Jobs are spread over the zygotes as they free up; results come back in input order, and one
job's failure never affects another's. A zygote lost mid-batch (killed, crashed or silent past
its deadline) is replaced and its batch's jobs run again once, each alone; a job that loses a
zygote on that second try too gets an error. Every job runs at one canonical hash seed
(SandboxConfig.hash_seed), except those a call pins to group 1: a determinism check's second
run, on zygotes of a second seed that share each worker's CPU with the canonical ones."""

from __future__ import annotations

import fcntl
import marshal
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import deque
from dataclasses import replace
from pathlib import Path

from .. import _sandbox
from .config import AZR_MODULES_UNDER_ANOTHER_UID, SandboxConfig, check_timeout
from .protocol import HEADER_SIZE, encode, length_at
from .result import Result
from .trace import stages

# How long past its job's own timeout a zygote may stay silent before it is presumed stuck,
# killed and replaced. The zygote itself enforces the job's timeout; this guards the zygote.
ZYGOTE_GRACE_S = 5.0
# The zygote compiles a batch before running it, untimed: ~1.5 s per million characters of
# source measured on the dev VM; this allowance goes into each batch's deadline.
COMPILE_S_PER_CHAR = 3e-6
STARTUP_TIMEOUT_S = 60.0
# PYTHONHASHSEED takes 0 to 2**32 - 1.
HASH_SEEDS = 1 << 32
# Jobs sent to a zygote in one message: one round trip and one compile pass per batch
# instead of per job (see zygote.run_batch).
MAX_BATCH = 32


class SandboxError(RuntimeError):
    """The sandbox could not start or lost its workers; the message says what to change."""


class Zygote:
    """The trainer's handle on one zygote process: worker `index`'s zygote of hash-seed `group`
    (0: the canonical seed, 1: the second seed of determinism checks)."""

    def __init__(self, index: int, settings: dict, group: int, hash_seed: int):
        self.index, self.group = index, group
        cpus = settings["cpus"]
        settings = {**settings, "cpu": cpus[index % len(cpus)] if cpus else None, "shift_heap": group == 1}
        self.sock, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])
        # What -I would do but keep PYTHONHASHSEED: no working directory on the path (-P is 3.11+).
        bootstrap = (f"import sys; sys.path[:] = [{package_root!r}, *filter(None, sys.path)]; "
                     "from fastazr.sandbox.zygote import main; main()")
        channel = -1
        try:
            # Handed over above every descriptor a child is built from, so no child ever holds
            # the trainer's socket at a number it writes to; duplicated here, not in the zygote,
            # which then needs no fcntl module (5 mappings every fork copies).
            channel = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)
            self.process = subprocess.Popen(
                # Not -I, which ignores PYTHONHASHSEED: the environment is scrubbed_env() plus the
                # seed, so no other PYTHON* variable can reach it. -s: no user site. -S: no
                # site-packages .pth hooks, which imported pathlib, zipfile, tempfile... here.
                # Settings as marshal in hex: json would cost the zygote, and so every fork, 116 KiB
                # and 5 mappings more.
                [sys.executable, "-s", "-S", "-c", bootstrap, str(channel), marshal.dumps(settings).hex()],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(channel,),
                env={**scrubbed_env(), **huge_arena_env(settings["huge_arenas"]), "PYTHONHASHSEED": str(hash_seed)},
                cwd=settings["workdir"],
                start_new_session=True,
            )
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
            if channel >= 0:
                os.close(channel)
        self.sock.setblocking(False)
        self.buffer = bytearray()
        self.batch: list[int] = []
        self.deadline = 0.0
        self.hello: dict | None = None

    def send(self, batch: list[int], jobs: list[dict], timeout_s: float) -> None:
        """Hand a batch over; OSError if the zygote is gone."""
        self.batch = batch
        work = sum(timeout_s + COMPILE_S_PER_CHAR * (len(jobs[i]["program"]) + len(jobs[i].get("args", "")))
                   for i in batch)
        self.deadline = time.monotonic() + work + ZYGOTE_GRACE_S
        self.sock.setblocking(True)
        self.sock.sendall(encode((timeout_s, [marshal.dumps(jobs[i]) for i in batch])))
        self.sock.setblocking(False)

    def receive(self):
        """The message completed by what is readable now, [] while it is partial, None when the
        zygote is gone. A zygote sends one message per batch and waits for the next."""
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data
        if len(self.buffer) < HEADER_SIZE:
            return []
        n = length_at(self.buffer)
        if len(self.buffer) < HEADER_SIZE + n:
            return []
        body = bytes(self.buffer[HEADER_SIZE:HEADER_SIZE + n])
        del self.buffer[:HEADER_SIZE + n]
        return [marshal.loads(body)]

    def wait_hello(self, timeout_s: float) -> dict:
        end = time.monotonic() + timeout_s
        while self.hello is None:
            if time.monotonic() > end or self.process.poll() is not None:
                raise SandboxError(f"sandbox zygote did not start: {self.stderr_tail()}")
            selectors_wait(self.sock, end - time.monotonic())
            messages = self.receive()
            if messages is None:
                raise SandboxError(f"sandbox zygote exited at start: {self.stderr_tail()}")
            if messages:
                self.hello = messages[0]
        return self.hello

    def stderr_tail(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        text = self.process.stderr.read().decode("utf-8", "replace") if self.process.stderr else ""
        if self.process.returncode == -signal.SIGSYS:
            return ("the zygote was killed by its own seccomp filter: a call it makes is missing from "
                    "fz_zygote_extra in csrc/sandbox/policy.c")
        return text.strip()[-2000:] or f"exit code {self.process.returncode}"

    def kill(self) -> None:
        """Stop it now, mid-batch or not; its children die with it (PR_SET_PDEATHSIG)."""
        self.process.kill()  # a no-op once it has been reaped

    def close(self) -> None:
        self.sock.close()  # the zygote sees end of file and exits
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def selectors_wait(sock: socket.socket, timeout_s: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        sel.select(max(timeout_s, 0.0))


def landlock_read_paths(workdir: str) -> list[str]:
    """Directories a child may read: the standard library (for lazy imports) and its workdir.
    Worked out here so the zygote need not import sysconfig."""
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    paths.add(os.path.dirname(os.__file__))
    paths.add(workdir)
    return sorted(p for p in paths if os.path.isdir(p))


def scrubbed_env() -> dict:
    """What a zygote inherits: enough to run Python, nothing of the trainer's secrets.
    LD_BIND_NOW resolves every shared-library symbol once, in the zygote; resolved lazily,
    each child would look up and write (so copy) its GOT entries again (~8 faults a job)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "LD_BIND_NOW": "1"}


def huge_arena_env(wanted: bool) -> dict:
    """What makes a zygote keep its object arenas and glibc heap in huge pages
    (SandboxConfig.huge_arenas; csrc/sandbox/stash.c): the C module preloaded, so its allocator
    is in place before the interpreter's first arena, and glibc told to grow its heap in
    madvised 2 MiB steps (children inherit that: a job's heap past the zygote's grows in huge
    pages too, where its arenas are mapped page by page as without it)."""
    path = _sandbox.__file__
    if not wanted or " " in path or ":" in path:  # LD_PRELOAD splits paths on both
        return {}
    # The module needs libpython's symbols: preloaded into a launcher script's shell (some
    # nix or Bazel setups make sys.executable one), it would stop the zygote from starting.
    try:
        with open(sys.executable, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return {}
    except OSError:
        return {}
    return {"LD_PRELOAD": path, "FASTAZR_HUGE_ARENAS": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


class Sandbox:
    """Runs untrusted Python in hardened, single-use child processes. See module docstring."""

    def __init__(self, workers: int | None = None, timeout_s: float | None = None,
                 memory_mb: int | None = None, config: SandboxConfig | None = None, **options):
        if config is not None and options:
            raise TypeError(f"Sandbox: pass the options {', '.join(sorted(options))} inside config "
                            f"(dataclasses.replace(config, ...)), not beside it: beside it they would be ignored")
        config = config or SandboxConfig(**options)
        overrides = {k: v for k, v in (("workers", workers), ("timeout_s", timeout_s), ("memory_mb", memory_mb)) if v is not None}
        self.config = replace(config, **overrides) if overrides else config
        self.protections = self._decide_protections()
        self._workdir = tempfile.mkdtemp(prefix="fastazr-sandbox-")
        os.chmod(self._workdir, 0o555)  # empty, and nobody may create anything in it
        self._settings = self._zygote_settings()
        # Group 1's seed: any but the canonical one, drawn per Sandbox so that over many
        # Sandboxes a hash-dependent program meets many seeds.
        offset = 1 + int.from_bytes(os.urandom(4), "little") % (HASH_SEEDS - 1)
        self.hash_seeds = (self.config.hash_seed, (self.config.hash_seed + offset) % HASH_SEEDS)
        # Per worker, its zygote of each hash-seed group; group 1's start on first use.
        self._zygotes: list[Zygote] = []
        self._alternates: list[Zygote] = []
        # Zygotes whose channel state is unknown (an interrupt left them mid-batch or mid-frame):
        # replaced before the next call, so no late reply is taken for a later job's.
        self._broken: set[Zygote] = set()
        self._selector = selectors.DefaultSelector()
        try:
            self._zygotes = self._start(0)
            self._self_test()
        except BaseException:
            self.close()
            raise

    # ---- setup ----

    def _decide_protections(self) -> dict:
        c = self.config
        backend = c.seccomp_backend
        if backend == "auto":
            backend = "libseccomp" if _sandbox.have_libseccomp() else "bpf"
        elif backend == "libseccomp" and not _sandbox.have_libseccomp():
            raise SandboxError("SandboxConfig.seccomp_backend='libseccomp' but fastazr was built without "
                               "libseccomp headers: install libseccomp-dev and reinstall, or use 'auto'")
        abi = _sandbox.landlock_abi()
        if c.landlock == "on" and abi == 0:
            raise SandboxError("SandboxConfig.landlock='on' but this kernel has no Landlock "
                               "(needs Linux >= 5.13 with the landlock LSM): use 'auto' or 'off'")
        landlock = abi if c.landlock != "off" and abi > 0 else 0
        root = os.geteuid() == 0
        drop = root and (c.drop_privileges == "on" or (c.drop_privileges == "auto" and not landlock))
        files = "landlock" if landlock else "other uid" if drop else "same uid"
        if files == "same uid":
            warnings.warn("fastazr sandbox: without Landlock (Linux >= 5.13) or a root trainer to drop children "
                          "to another uid, jobs can read files this user can, /proc/<trainer>/environ included",
                          RuntimeWarning, stacklevel=3)
        return {"seccomp": backend, "landlock_abi": landlock, "files": files,
                "uid": c.unprivileged_uid if drop else os.geteuid(),
                "capabilities": "none" if root else "unprivileged",
                "rlimits": "hard == soft", "no_new_privs": True, "dumpable": False}

    def _zygote_settings(self) -> dict:
        c, p = self.config, self.protections
        return {"workdir": self._workdir, "memory_mb": c.memory_mb, "open_files": c.open_files, "backend": p["seccomp"],
                "drop_to_uid": p["uid"] if p["uid"] != os.geteuid() else -1,
                "landlock_paths": landlock_read_paths(self._workdir) if p["landlock_abi"] else [],
                "max_output_bytes": c.max_output_bytes,
                "max_value_chars": c.max_value_chars,
                "preload": list(c.preload) + ([m for m in AZR_MODULES_UNDER_ANOTHER_UID if m not in c.preload]
                                              if p["uid"] != os.geteuid() else []),
                "cpus": sorted(os.sched_getaffinity(0)) if c.pin_cpus else [], "trace": c.trace,
                "huge_arenas": c.huge_arenas}

    def _start(self, group: int) -> list[Zygote]:
        """One zygote of hash-seed group `group` per worker, started side by side."""
        zygotes = [Zygote(i, self._settings, group, self.hash_seeds[group]) for i in range(self.config.workers)]
        try:
            for z in zygotes:
                self._check_memory(z.wait_hello(STARTUP_TIMEOUT_S))
                self._selector.register(z.sock, selectors.EVENT_READ, z)
        except BaseException:
            for z in zygotes:
                self._unregister(z)
                z.close()
            raise
        return zygotes

    def _check_memory(self, hello: dict) -> None:
        need = hello["vm_bytes"] + (32 << 20)
        if self.config.memory_mb << 20 < need:
            raise SandboxError(f"SandboxConfig.memory_mb={self.config.memory_mb} is below what the interpreter "
                               f"already maps ({hello['vm_bytes'] >> 20} MiB): raise it to at least {(need >> 20) + 1}")

    def _self_test(self) -> None:
        probe = self.call_many([("def f():\n    return 6 * 7\n", "f", "")] * len(self._zygotes))
        for r in probe:
            if r.status != "ok" or r.value != "42":
                raise SandboxError(f"the sandbox could not run a trivial program ({r.status}: {r.error}); "
                                   f"protections were {self.protections}")

    # ---- running jobs ----

    def call_many(self, calls, timeout_s: float | None = None, groups=None, progress=None) -> list[Result]:
        """Run `entry(*args)` after executing `program`, for each (program, entry, args_source).

        args_source is Python source for the arguments ("[1, 2], 'x'"), evaluated inside the
        child. Jobs run at the canonical str/bytes hash seed (hash_seeds[0]); groups, if given,
        sends job i to hash_seeds[groups[i]] (0 or 1; None is 0): the second run of a
        determinism check goes to group 1, so a program whose value follows the seed is seen.

        progress, if given, is called as results come in: progress(n), n the jobs just
        finished (once per zygote reply, so up to MAX_BATCH at a time); the calls sum to the
        number of jobs."""
        if isinstance(calls, (str, tuple)) and calls and isinstance(calls[0], str):
            raise TypeError("call_many takes a list of (program, entry, args_source) tuples; for one call, "
                            "wrap it: call_many([(program, entry, args)])")
        jobs = []
        for call in calls:
            if not (isinstance(call, (tuple, list)) and len(call) == 3):
                raise TypeError(f"call_many: each call must be a (program, entry, args_source) tuple, got {call!r:.200}")
            jobs.append({"kind": "call", "program": call[0], "entry": call[1], "args": call[2]})
        return self._run(jobs, timeout_s, groups, progress)

    def exec_many(self, sources, timeout_s: float | None = None, progress=None) -> list[Result]:
        """Execute whole programs; each Result carries status and captured stdout/stderr.
        progress: as in call_many."""
        if isinstance(sources, str):
            raise TypeError("exec_many takes a list of program sources, not one str (whose characters would "
                            "each run as a program): exec_many([source])")
        return self._run([{"kind": "exec", "program": s} for s in sources], timeout_s, None, progress)

    def _run(self, jobs: list[dict], timeout_s: float | None, groups, progress) -> list[Result]:
        if not self._zygotes:
            raise SandboxError("this Sandbox is closed")
        if progress is not None and not callable(progress):
            raise TypeError(f"the sandbox's progress must be a callable taking a job count (a bar's update "
                            f"method), got {type(progress).__name__}")
        if timeout_s is not None:
            check_timeout("timeout_s", timeout_s)
        if groups is not None and (len(groups) != len(jobs) or any(g not in (None, 0, 1) for g in groups)):
            raise ValueError(f"groups must hold 0, 1 or None for each of the {len(jobs)} jobs, got {groups!r:.200}")
        self._repair()
        timeout = self.config.timeout_s if timeout_s is None else timeout_s
        results: list[Result | None] = [None] * len(jobs)
        for i, job in enumerate(jobs):
            if not all(isinstance(job.get(k, ""), str) for k in ("program", "entry", "args")):
                raise TypeError("programs, entry names and argument sources must be str")
            if len(job["program"]) + len(job.get("args", "")) > self.config.max_program_chars:
                results[i] = Result("error", error=f"the program and its input exceed max_program_chars="
                                                   f"{self.config.max_program_chars}")
        progress = _ignore if progress is None else progress
        pending = [i for i, r in enumerate(results) if r is None]
        if len(pending) < len(jobs):
            progress(len(jobs) - len(pending))  # refused unrun: finished already
        queues = (deque(i for i in pending if not groups or groups[i] != 1),
                  deque(i for i in pending if groups and groups[i] == 1))
        if queues[1] and not self._alternates:
            self._alternates = self._start(1)
        self._dispatch(queues, jobs, timeout, results, progress)
        return results  # type: ignore[return-value]

    def _dispatch(self, queues: tuple[deque, deque], jobs: list[dict], timeout: float, results: list,
                  progress) -> None:
        """Run the jobs queued per hash-seed group. A worker runs one batch at a time, on its
        zygote of that batch's group (both sit on the worker's CPU)."""
        idle, busy = list(range(len(self._zygotes))), set()
        retried: set[int] = set()  # jobs already re-queued once after their zygote was lost
        try:
            while any(queues) or busy:
                for worker in list(idle):
                    group, batch = self._next_batch(queues, retried)
                    if not batch:
                        break
                    z = (self._alternates if group else self._zygotes)[worker]
                    idle.remove(worker)
                    busy.add(z)  # before sending: an interrupt mid-frame must leave it marked
                    try:
                        z.send(batch, jobs, timeout)
                    except OSError:  # it died while idle: its batch goes back to the queue, unrun
                        busy.discard(z)
                        queues[group].extendleft(reversed(batch))
                        self._replace(z)
                        idle.append(worker)
                for key, _ in self._selector.select(timeout=1.0):
                    z = key.data
                    messages = z.receive()
                    if messages == []:
                        continue
                    if z not in busy:  # an idle zygote has nothing to say but end of file
                        if messages is None:
                            self._replace(z)
                        continue
                    busy.discard(z)
                    if messages is None:
                        progress(self._lost(z, queues, retried, results, f"died ({z.stderr_tail()})"))
                        self._replace(z)
                    else:
                        for i, reply in zip(z.batch, messages[0]):
                            results[i] = result_from(marshal.loads(reply))
                        progress(len(z.batch))
                    idle.append(z.index)
                now = time.monotonic()
                for z in [z for z in busy if now > z.deadline]:
                    busy.discard(z)
                    # Killed before _replace closes it: a stopped zygote would not exit on end of
                    # file, and close() would wait 2 s for it.
                    z.kill()
                    progress(self._lost(z, queues, retried, results, "stopped answering and was killed"))
                    self._replace(z)
                    idle.append(z.index)
        except BaseException:
            # An exception (a caught Ctrl-C, an alarm) left busy zygotes whose replies would be
            # read as the next call's: stop them now, replace them before the next call.
            for z in busy:
                z.kill()
            self._broken.update(busy)
            raise

    @staticmethod
    def _lost(z: Zygote, queues: tuple[deque, deque], retried: set[int], results: list, why: str) -> int:
        """z was lost mid-batch, before its one reply, so none of its jobs has a result. Each job
        on its first try goes back to the front of its group's queue (the same hash seed), to
        run alone (see _next_batch); one that was already retried gets an error. Returns how
        many jobs that finished (as errors), for progress."""
        again = [i for i in z.batch if i in retried]
        for i in again:
            results[i] = Result("error", error=f"sandbox worker died twice with this job in its batch: its retry "
                                               f"ran alone on a fresh zygote, which {why}. A job is retried once "
                                               "only; if many jobs report this, look for what kills the zygotes "
                                               "(the kernel's out-of-memory killer: dmesg)")
        first = [i for i in z.batch if i not in retried]
        retried.update(first)
        queues[z.group].extendleft(reversed(first))
        return len(again)

    def _next_batch(self, queues: tuple[deque, deque], retried: set[int]) -> tuple[int, list[int]]:
        """(group, up to MAX_BATCH jobs of it), canonical jobs first. Batches shrink as a queue
        drains (a quarter of each worker's fair share), so the last jobs still spread over all
        workers. A retried job runs in a batch of its own: if it is what kills zygotes, its
        second loss takes no other job down with it (one round trip per retried job, paid
        only after a loss)."""
        group = 0 if queues[0] else 1
        queue = queues[group]
        if not queue:
            return group, []
        if queue[0] in retried:
            return group, [queue.popleft()]
        size = min(MAX_BATCH, max(1, len(queue) // (4 * len(self._zygotes))))
        batch = []
        while queue and len(batch) < size and queue[0] not in retried:
            batch.append(queue.popleft())
        return group, batch

    def _replace(self, z: Zygote) -> None:
        """A fresh zygote in z's place. Until it has said hello, z's place stays in _broken,
        so an interrupt here leaves it to _repair, never half-started."""
        zygotes = self._alternates if z.group else self._zygotes
        self._broken.add(z)
        self._unregister(z)
        z.close()
        fresh = Zygote(z.index, self._settings, z.group, self.hash_seeds[z.group])
        zygotes[z.index] = fresh
        self._broken.add(fresh)
        self._broken.discard(z)
        fresh.wait_hello(STARTUP_TIMEOUT_S)
        self._selector.register(fresh.sock, selectors.EVENT_READ, fresh)
        self._broken.discard(fresh)

    def _repair(self) -> None:
        """Replace every zygote an interrupted call left in an unknown state."""
        for z in list(self._broken):
            if z in (self._alternates if z.group else self._zygotes):
                z.kill()
                self._replace(z)
            else:
                self._broken.discard(z)

    def _unregister(self, z: Zygote) -> None:
        try:
            self._selector.unregister(z.sock)
        except (KeyError, ValueError):  # never registered, or already taken off
            pass

    # ---- lifetime ----

    def close(self) -> None:
        for z in self._zygotes + self._alternates:
            if z in self._broken:
                z.kill()
            z.close()
        self._zygotes, self._alternates = [], []
        self._selector.close()
        if getattr(self, "_workdir", None):
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_zygotes", None):
            self.close()


def _ignore(n: int) -> None:
    """The progress callback of a call that passed none."""


def result_from(message: dict) -> Result:
    return Result(status=message["status"], value=message.get("value"), error=message.get("error"),
                  duration_s=message.get("duration_s", 0.0), stdout=message.get("stdout", ""),
                  stderr=message.get("stderr", ""), stages=stages(message["trace"]) if "trace" in message else None)
