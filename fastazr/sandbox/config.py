"""SandboxConfig: every knob of the sandbox, validated when it is built."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

# Modules AZR programs use, imported once per zygote so no child pays for them. A child's
# lazy import of anything else still works (read-only, within Landlock's stdlib rule). Every
# job pays for what is preloaded: fork copies, and exit tears down, one page-table entry per
# private page of the zygote, ~45 us a job per MiB on the 2-core dev VM (Linux 6.18; less for
# its objects in huge-page arenas, SandboxConfig.huge_arenas, not for its own mappings). So a
# module is preloaded only where that beats what the jobs importing it would pay themselves:
# dataclasses (1.3 MiB with inspect, ast and dis; ~7 ms to import in a child), statistics,
# fractions and decimal (0.4 MiB, 10 mappings; ~2.4 ms) cost every job ~75 us to save that only
# for the few that import them (break-even near 1 job in 100); typing (0.6 MiB, ~2.9 ms) is in
# most model-written programs' first line.
AZR_MODULES = (
    "math", "itertools", "collections", "functools", "heapq", "bisect", "re", "string",
    "typing", "copy", "operator",
    # the zygote reseeds it before every fork
    "random",
)
# Preloaded as well when children run as another uid (SandboxConfig.drop_privileges): that uid
# may be unable to read the stdlib at all (a pyenv under /root), so a lazy import in a child,
# which works under Landlock's stdlib rule, would fail there.
AZR_MODULES_UNDER_ANOTHER_UID = ("dataclasses", "statistics", "fractions", "decimal")

STATUSES = ("ok", "error", "timeout", "memory", "violation", "output_limit")


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_timeout(option: str, value) -> None:
    """A wall-clock limit in seconds: a finite number > 0 (the zygote takes int(value) + 2 as
    RLIMIT_CPU, so inf failed inside a worker, after the model had loaded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise ValueError(f"{option}: must be a finite number of seconds > 0 (below 1e9), got {value!r}")


@dataclass
class SandboxConfig:
    """How the sandbox runs untrusted programs. Every limit applies to each job separately."""

    workers: int = field(default_factory=default_workers)
    """Zygote processes, i.e. jobs running at once. Defaults to the cores this process may use."""

    timeout_s: float = 5.0
    """Wall-clock limit per job; the zygote SIGKILLs the child when it passes. RLIMIT_CPU
    (this + 2 s, hard) backs it up from the kernel's side."""

    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) of a child, in MiB, counting the ~30 MiB interpreter."""

    max_value_chars: int = 100_000
    """Longest repr a call may return; a longer one is the status output_limit, never cut."""

    max_output_bytes: int = 1_000_000
    """Most bytes a job may write to stdout plus stderr before it is killed with output_limit."""

    max_program_chars: int = 1_000_000
    """Longest program plus input source accepted; longer ones get status "error" unrun."""

    open_files: int = 32
    """RLIMIT_NOFILE of a child (it starts with four descriptors: stdin, stdout, stderr and
    its result pipe)."""

    seccomp_backend: str = "auto"
    """'bpf' (the filter assembled in C), 'libseccomp' (needs it at build time), or 'auto'."""

    landlock: str = "auto"
    """'on' (fail when the kernel lacks Landlock), 'off', or 'auto' (use it when available).
    Landlock confines a child's file reads to the Python standard library."""

    drop_privileges: str = "auto"
    """'on': a root parent's children run as uid/gid `unprivileged_uid`; 'off': they keep the
    uid (with every capability dropped); 'auto': drop only when Landlock is unavailable, since
    it then is what keeps /proc and other files out of reach."""

    unprivileged_uid: int = 65534
    """The uid and gid children take when privileges are dropped (65534 is 'nobody')."""

    pin_cpus: bool = True
    """Pin zygote i (and so its children) to the i-th CPU this process may use: fork, the
    child's run and the zygote's wakeup then stay on one CPU, with no cross-CPU wakeups and
    the zygote's pages warm in that CPU's caches when the child reads them."""

    huge_arenas: bool = True
    """Keep each zygote's Python object arenas and glibc heap in 2 MiB transparent huge pages
    (the zygote starts with fastazr._sandbox in LD_PRELOAD; csrc/sandbox/stash.c): fork then
    copies, and each child's exit tears down, ~950 fewer page-table entries, and the zygote
    faults 36 times a job instead of 105 (~20% less CPU a job on the 2-core VM), for ~2.5 MiB
    more resident memory per zygote. Where THP is off ('never') or the module's path holds a
    space or colon (which LD_PRELOAD splits on) they stay in 4 KiB pages, as with this off.
    Children's limits, filters and isolation are the same either way."""

    preload: tuple[str, ...] = AZR_MODULES
    """Modules every zygote imports before it forks children."""

    hash_seed: int = 0
    """The str/bytes hash seed (PYTHONHASHSEED, 0 to 2**32 - 1) every job runs at, so set
    order, hash() and all built from them repeat on every run: a program validated at this
    seed gives its validated output on any later run. Determinism checks run a second time
    at another seed (groups in Sandbox.call_many)."""

    trace: bool = False
    """Stamp every stage of every job (Result.stages; `bench/bench_sandbox.py --breakdown`):
    ~50 us a job (5% of the bench's mix on the 2-core VM) of clock and fault-counter reads and
    carrying them back, and one page that zygote and child share.
    For measuring only: a job could overwrite its own stamps."""

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> ValueError:
            return ValueError(f"SandboxConfig.{option}: {why}")

        def integer(option: str, low: int, high: int, why: str = "") -> None:
            value = getattr(self, option)
            if not is_int(value) or not low <= value <= high:
                raise bad(option, f"must be an integer from {low} to {high}{why}, got {value!r}")

        integer("workers", 1, 1 << 16)
        check_timeout("SandboxConfig.timeout_s", self.timeout_s)
        # memory_mb << 20 is the child's RLIMIT_AS, an unsigned 64-bit count of bytes in C
        integer("memory_mb", 64, 1 << 40, " MiB (64 holds a Python interpreter)")
        for option in ("max_value_chars", "max_output_bytes", "max_program_chars"):
            integer(option, 1, 1 << 40)
        integer("open_files", 8, 1 << 20, " (a child needs 8 descriptors)")
        if self.seccomp_backend not in ("auto", "bpf", "libseccomp"):
            raise bad("seccomp_backend", f"must be 'auto', 'bpf' or 'libseccomp', got {self.seccomp_backend!r}")
        for option in ("landlock", "drop_privileges"):
            if getattr(self, option) not in ("auto", "on", "off"):
                raise bad(option, f"must be 'auto', 'on' or 'off', got {getattr(self, option)!r}")
        integer("hash_seed", 0, (1 << 32) - 1, " (PYTHONHASHSEED)")
        # uid_t is 32 bits: 2**32 would wrap to root, and 2**32 - 1 means "unchanged" to setresuid
        integer("unprivileged_uid", 1, (1 << 32) - 2, ", a non-root uid")
        for option in ("pin_cpus", "huge_arenas", "trace"):
            if not isinstance(getattr(self, option), bool):
                raise bad(option, f"must be True or False, got {getattr(self, option)!r}")
        if not isinstance(self.preload, tuple) or not all(isinstance(m, str) and m for m in self.preload):
            raise bad("preload", f"must be a tuple of module names, got {self.preload!r}")
        # here, not as the zygote's traceback at start (a typo, a module not installed)
        missing = [m for m in self.preload if not _findable(m)]
        if missing:
            raise bad("preload", f"no module named {', '.join(missing)} (the zygotes import these before forking)")


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that is no package, an empty or relative name
        return False
