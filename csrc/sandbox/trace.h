/* Per-stage clock stamps of one job, for `bench/bench_sandbox.py --breakdown`.
 *
 * Off unless SandboxConfig.trace is on: fz_trace is then NULL and a stamp is one predictable
 * branch. On, it points at one MAP_SHARED page that the zygote and the job's child both write:
 * each stamp is a CLOCK_MONOTONIC read (vDSO, ~20 ns) and a getrusage for the minor-fault count
 * (~1 us with both seccomp filters walked; each lands in the stage after it). With the Python
 * side's stamps and the stages carried back, tracing slowed the bench's mix by ~5% (~50 us a
 * job) on the 2-core VM. The zygote reads the page once the child is gone and zeroes it before
 * the next fork, so a child sees no other job's stamps. */
#ifndef FASTAZR_TRACE_H
#define FASTAZR_TRACE_H

#include <stdint.h>
#include <sys/resource.h>
#include <time.h>

/* In the order they are taken on one CPU (the zygote and its children are pinned together);
 * fastazr/sandbox/trace.py turns consecutive pairs into stages. */
#define FZ_STAMPS(X)                                                                             \
    X(job_enter)        /* zygote, Python: run_one starts */                                     \
    X(spawn_enter)      /* zygote, C: _sandbox.spawn called */                                   \
    X(pipes_made)       /* zygote: dying children reaped, three pipes made and sized */          \
    X(forked)           /* zygote: fork() returned in the parent */                              \
    X(supervising)      /* zygote: pipe ends closed, pidfd opened, about to poll */              \
    X(child_start)      /* child: fork() returned in the child */                                \
    X(child_fds)        /* child: own process group, descriptors placed */                       \
    X(child_limits)     /* child: uid dropped (when it is), rlimits set */                       \
    X(child_prctl)      /* child: parent-death signal, the zygote still its parent */            \
    X(child_landlock)   /* child: Landlock ruleset enforced */                                   \
    X(child_sigsys)     /* child: SIGSYS handler installed */                                    \
    X(child_seccomp)    /* child: child-stage filter installed; hardening done */                \
    X(job_start)        /* child, Python: serve() entered, collector on */                       \
    X(job_done)         /* child: the job returned (exec, call, repr) */                         \
    X(result_sent)      /* child: stdout/stderr flushed, result frame written */                 \
    X(exit_seen)        /* zygote: pidfd readable: the child has exited */                       \
    X(reaped)           /* zygote: wait4 done, pipes drained and closed */                       \
    X(job_leave)        /* zygote, Python: outcome stashed, run_one returns */

#define FZ_STAMP_ENUM(name) FZ_STAMP_##name,
enum fz_stamp { FZ_STAMPS(FZ_STAMP_ENUM) FZ_NSTAMPS };
#undef FZ_STAMP_ENUM

struct fz_trace {
    int64_t ns[FZ_NSTAMPS];     /* CLOCK_MONOTONIC, 0 = not reached */
    int64_t faults[FZ_NSTAMPS]; /* the stamping process's minor faults so far */
};

/* Set by _sandbox.configure(trace=True); every child inherits the mapping. */
extern struct fz_trace *fz_trace;

static inline void fz_stamp(enum fz_stamp s) {
    if (fz_trace == NULL) return;
    struct timespec t;
    struct rusage ru;
    clock_gettime(CLOCK_MONOTONIC, &t);
    getrusage(RUSAGE_SELF, &ru);
    fz_trace->ns[s] = (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
    fz_trace->faults[s] = ru.ru_minflt;
}

#endif
