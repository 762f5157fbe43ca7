"""A job's stages from its stamps (SandboxConfig.trace): what `bench_sandbox.py --breakdown` prints.

The zygote and its children share one CPU (SandboxConfig.pin_cpus), so a job's stamps run in
the order of csrc/sandbox/trace.h and each stage below is the gap between two consecutive
ones; the stages of one job sum to its whole cycle in the zygote, from run_one's start to its
end. Compiling and judging happen once per batch, outside that cycle, and are timed per job.
Stages that pass from one process to the other (the switch into the child, its exit) have
their faults counted on the side that can see them."""

from __future__ import annotations

from .. import _sandbox

STAMPS = _sandbox.stamp_names()
CHILD_STAMPS = frozenset(STAMPS[STAMPS.index("child_start"):STAMPS.index("result_sent") + 1])

# (stage, stamp it ends at); each starts where the previous one ended.
CYCLE = (
    ("zygote: fetch job, reseed random", "spawn_enter"),
    ("zygote: reap, make 3 pipes", "pipes_made"),
    ("zygote: fork (parent side)", "forked"),
    ("zygote: close ends, pidfd_open", "supervising"),
    ("switch to child (fork return)", "child_start"),
    ("child: own process group, place fds", "child_fds"),
    ("child: (uid drop,) 4 rlimits", "child_limits"),
    ("child: parent-death signal", "child_prctl"),
    ("child: Landlock restrict_self", "child_landlock"),
    ("child: SIGSYS handler", "child_sigsys"),
    ("child: seccomp filter", "child_seccomp"),
    ("child: back into Python", "job_start"),
    ("child: the job (unmarshal, exec, call, repr)", "job_done"),
    ("child: flush, result frame", "result_sent"),
    ("child exit, zygote wakeup", "exit_seen"),
    ("zygote: wait4, drain, close", "reaped"),
    ("zygote: back into Python, stash", "job_leave"),
)
BATCH = ("compiler: compile (per job; 0 if cached)", "zygote: judge reply (per job)")
STAGES = tuple(name for name, _ in CYCLE) + BATCH


def stages(trace) -> dict[str, tuple[float, int | None]]:
    """{stage: (seconds, minor faults or None)} from a reply's raw trace: the stamps' ns and
    fault counts (tuples indexed like STAMPS), then the compile and judge times in ns."""
    ns, faults, compile_ns, judge_ns = trace
    out = {}
    previous = "job_enter"
    last_zygote = previous
    for name, stamp in CYCLE:
        a, b = STAMPS.index(previous), STAMPS.index(stamp)
        if (previous in CHILD_STAMPS) == (stamp in CHILD_STAMPS):
            count = faults[b] - faults[a]
        elif stamp in CHILD_STAMPS:
            count = faults[b]  # a child's counter starts at 0 at fork
        else:
            count = faults[b] - faults[STAMPS.index(last_zygote)]
        out[name] = ((ns[b] - ns[a]) * 1e-9, count)
        if stamp not in CHILD_STAMPS:
            last_zygote = stamp
        previous = stamp
    out[BATCH[0]] = (compile_ns * 1e-9, None)
    out[BATCH[1]] = (judge_ns * 1e-9, None)
    return out
