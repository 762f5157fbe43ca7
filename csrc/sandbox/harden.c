/* Runs in the child between fork and the job: after it returns, the process can compute, read
 * what Landlock allows, write to its own pipes and exit; everything else traps. */
#include "harden.h"

#include "policy.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Landlock's kernel ABI, spelled out here because distribution headers lag the kernel (Debian 12
 * ships the ABI 2 header; ABI 4 adds TCP, ABI 6 scopes signals and abstract sockets). */
struct fz_landlock_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct fz_landlock_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));
enum {
    FZ_LL_CREATE_VERSION = 1, FZ_LL_RULE_PATH_BENEATH = 1,
    FZ_LL_NET_BIND_TCP = 1, FZ_LL_NET_CONNECT_TCP = 2,
    FZ_LL_SCOPE_ABSTRACT_UNIX = 1, FZ_LL_SCOPE_SIGNAL = 2,
};
#define FZ_LL_FS_EXECUTE (1ULL << 0)
#define FZ_LL_FS_READ_FILE (1ULL << 2)
#define FZ_LL_FS_READ_DIR (1ULL << 3)

#define FAIL(...) do { snprintf(err, errlen, __VA_ARGS__); return -1; } while (0)

/* ---- violation reporting (async-signal-safe) ---- */

static char *put_uint(char *p, unsigned long v) {
    char tmp[24];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *p++ = tmp[--n];
    return p;
}

/* A child result frame (fastazr/sandbox/protocol.py): 4-byte big-endian body length; body =
 * status byte (4 = violation), 4-byte value length (0), then the error text: the syscall number. */
static void on_sigsys(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)ctx;
    char frame[32] = {0, 0, 0, 0, 4, 0, 0, 0, 0};
    char *end = put_uint(frame + 9, (unsigned long)(unsigned)info->si_syscall);
    uint32_t n = (uint32_t)(end - frame - 4);
    frame[3] = (char)n;
    ssize_t unused = write(FZ_FD_RESULT, frame, (size_t)(end - frame));
    (void)unused;
    syscall(__NR_exit_group, 0);
}

/* ---- descriptors ---- */

static int place_fds(const struct fz_harden_opts *o, int *landlock_fd, char *err, size_t errlen) {
    int src[5] = {o->devnull_fd, o->stdout_fd, o->stderr_fd, o->result_fd, *landlock_fd};
    int count = *landlock_fd >= 0 ? 5 : 4;
    /* A source among the targets could be clobbered by a dup2 before its own: then lift every
     * source above them first. fz_prepare_zygote keeps the zygote's own two above, and pipes
     * take the lowest free numbers, past those, so this costs a child no syscall. */
    int low = 0;
    for (int i = 0; i < count; i++) low |= src[i] < count;
    for (int i = 0; low && i < count; i++) {
        src[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 64);
        if (src[i] < 0) FAIL("fcntl(F_DUPFD) on a child descriptor: %s", strerror(errno));
    }
    for (int target = 0; target < count; target++)
        if (dup2(src[target], target) < 0) FAIL("dup2 to fd %d: %s", target, strerror(errno));
    if (syscall(__NR_close_range, (unsigned)count, ~0u, 0) != 0) {
        for (int fd = count; fd < 4096; fd++) close(fd);
    }
    if (*landlock_fd >= 0) *landlock_fd = 4;
    return 0;
}

/* ---- limits ---- */

static int limit(int resource, const char *name, rlim_t value, char *err, size_t errlen) {
    struct rlimit cur;
    if (getrlimit(resource, &cur) == 0 && cur.rlim_max != RLIM_INFINITY && cur.rlim_max < value)
        value = cur.rlim_max; /* an unprivileged process may only lower its hard limit */
    struct rlimit r = {value, value};
    if (setrlimit(resource, &r) != 0) FAIL("setrlimit(%s, %llu): %s", name, (unsigned long long)value, strerror(errno));
    return 0;
}

/* The limits the zygote can live under itself, set there once and inherited by every child. */
static int set_zygote_limits(char *err, size_t errlen) {
    if (limit(RLIMIT_FSIZE, "RLIMIT_FSIZE", 0, err, errlen) ||
        limit(RLIMIT_CORE, "RLIMIT_CORE", 0, err, errlen) ||
        limit(RLIMIT_MEMLOCK, "RLIMIT_MEMLOCK", 0, err, errlen) ||
        limit(RLIMIT_MSGQUEUE, "RLIMIT_MSGQUEUE", 0, err, errlen) ||
        limit(RLIMIT_LOCKS, "RLIMIT_LOCKS", 0, err, errlen))
        return -1;
    return 0;
}

/* What limit() would clamp value to, worked out once in the zygote: a child's hard limits are
 * the zygote's, so it can set the four limits of its own without reading them first. */
static uint64_t clamp_to_hard(int resource, uint64_t value) {
    struct rlimit cur;
    if (getrlimit(resource, &cur) == 0 && cur.rlim_max != RLIM_INFINITY && cur.rlim_max < value) return cur.rlim_max;
    return value;
}

static int set_child_limit(int resource, const char *name, rlim_t value, char *err, size_t errlen) {
    struct rlimit r = {value, value};
    if (setrlimit(resource, &r) != 0) FAIL("setrlimit(%s, %llu): %s", name, (unsigned long long)value, strerror(errno));
    return 0;
}

/* The zygote cannot live under these: it forks (NPROC), holds more descriptors than a child
 * may (NOFILE), and runs every job's setup (AS, CPU). */
static int set_limits(const struct fz_harden_opts *o, char *err, size_t errlen) {
    uint64_t cpu = o->cpu_seconds < o->cpu_seconds_max ? o->cpu_seconds : o->cpu_seconds_max;
    if (set_child_limit(RLIMIT_AS, "RLIMIT_AS", o->address_space, err, errlen) ||
        set_child_limit(RLIMIT_CPU, "RLIMIT_CPU", cpu, err, errlen) ||
        set_child_limit(RLIMIT_NPROC, "RLIMIT_NPROC", 0, err, errlen) ||
        set_child_limit(RLIMIT_NOFILE, "RLIMIT_NOFILE", o->open_files, err, errlen))
        return -1;
    return 0;
}

/* ---- landlock ---- */

int fz_landlock_abi(void) {
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, FZ_LL_CREATE_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

/* Every filesystem right the running kernel knows: bits 0-12 (ABI 1), refer (2), truncate (3),
 * ioctl on devices (5). Handled and not granted by a rule means denied. */
static uint64_t landlock_fs_rights(int abi) {
    int bits = abi >= 5 ? 16 : abi >= 3 ? 15 : abi >= 2 ? 14 : 13;
    return (1ULL << bits) - 1;
}

int fz_landlock_ruleset(const char *const *paths, size_t npaths, char *err, size_t errlen) {
    int abi = fz_landlock_abi();
    if (abi < 1) FAIL("Landlock is not available in this kernel");
    struct fz_landlock_ruleset_attr attr = {.handled_access_fs = landlock_fs_rights(abi)};
    size_t size = sizeof(uint64_t);
    if (abi >= 4) {
        attr.handled_access_net = FZ_LL_NET_BIND_TCP | FZ_LL_NET_CONNECT_TCP;
        size = 2 * sizeof(uint64_t);
    }
    if (abi >= 6) {
        attr.scoped = FZ_LL_SCOPE_ABSTRACT_UNIX | FZ_LL_SCOPE_SIGNAL;
        size = 3 * sizeof(uint64_t);
    }
    int rs = (int)syscall(__NR_landlock_create_ruleset, &attr, size, 0);
    if (rs < 0) FAIL("landlock_create_ruleset: %s", strerror(errno));
    for (size_t i = 0; i < npaths; i++) {
        int fd = open(paths[i], O_PATH | O_CLOEXEC);
        if (fd < 0) {
            close(rs);
            FAIL("cannot open %s for a Landlock read rule: %s", paths[i], strerror(errno));
        }
        struct fz_landlock_path_beneath beneath = {
            .allowed_access = FZ_LL_FS_READ_FILE | FZ_LL_FS_READ_DIR | FZ_LL_FS_EXECUTE,
            .parent_fd = fd,
        };
        long rc = syscall(__NR_landlock_add_rule, rs, FZ_LL_RULE_PATH_BENEATH, &beneath, 0);
        int saved = errno;
        close(fd);
        if (rc != 0) {
            close(rs);
            FAIL("landlock_add_rule(%s): %s", paths[i], strerror(saved));
        }
    }
    return rs;
}

/* ---- the whole sequence ---- */

/* The child-stage program, built once by fz_confine_zygote with FZ_PID_PLACEHOLDER where each
 * child's own pid goes: building it per child cost libseccomp ~120 page faults (0.4 ms). */
static struct sock_filter child_program[FZ_MAX_INSNS];
static int child_length = -1;

static int build(enum fz_backend backend, enum fz_stage stage, pid_t self, struct sock_filter *out, char *err,
                 size_t errlen) {
    if (backend == FZ_BACKEND_LIBSECCOMP) return fz_program_libseccomp(stage, self, out, FZ_MAX_INSNS, err, errlen);
    return fz_program_bpf(stage, self, out, FZ_MAX_INSNS, err, errlen);
}

static int install(struct sock_filter *insns, int n, char *err, size_t errlen) {
    struct sock_fprog prog = {.len = (unsigned short)n, .filter = insns};
    if (syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
        FAIL("seccomp(SET_MODE_FILTER): %s", strerror(errno));
    return 0;
}

static int install_child_program(char *err, size_t errlen) {
    if (child_length < 0) FAIL("the zygote's filters were never prepared (fz_confine_zygote)");
    uint32_t self = (uint32_t)getpid();
    for (int i = 0; i < child_length; i++)
        if (child_program[i].code == (BPF_JMP | BPF_JEQ | BPF_K) && child_program[i].k == FZ_PID_PLACEHOLDER)
            child_program[i].k = self;
    return install(child_program, child_length, err, errlen);
}

int fz_prepare_zygote(struct fz_harden_opts *o, char *err, size_t errlen) {
    /* A child starts in the zygote's working directory, the empty read-only workdir. */
    if (chdir(o->workdir) != 0) FAIL("chdir(%s): %s", o->workdir, strerror(errno));
    int *high[2] = {&o->devnull_fd, &o->landlock_fd};
    for (int i = 0; i < 2; i++) {
        if (*high[i] < 0) continue;
        int fd = fcntl(*high[i], F_DUPFD_CLOEXEC, 64);
        if (fd < 0) FAIL("fcntl(F_DUPFD) on the zygote's descriptor %d: %s", *high[i], strerror(errno));
        close(*high[i]);
        *high[i] = fd;
    }
    if (set_zygote_limits(err, errlen)) return -1;
    o->address_space = clamp_to_hard(RLIMIT_AS, o->address_space);
    o->open_files = clamp_to_hard(RLIMIT_NOFILE, o->open_files);
    o->cpu_seconds_max = clamp_to_hard(RLIMIT_CPU, UINT64_MAX);
    if (geteuid() == 0 && o->drop_to_uid < 0) {
        /* Root keeping its uid (Landlock confines its files) still loses every capability, so
         * no hard limit can be raised and no permission check overridden; the zygote needs
         * none to fork and harden children, who inherit the empty sets. (Dropping to another
         * uid empties them in the child.) */
        struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
        struct __user_cap_data_struct none[2];
        memset(none, 0, sizeof(none));
        if (syscall(__NR_capset, &head, none) != 0) FAIL("capset(empty): %s", strerror(errno));
    }
    return 0;
}

int fz_harden(const struct fz_harden_opts *o, char *err, size_t errlen) {
    pid_t parent = getppid();
    /* A process group of its own, out of the zygote's (which signals could only reach through
     * calls the filter denies anyway). Not setsid: a new session also makes the scheduler a new
     * autogroup (sched_autogroup_enabled): ~9 us a child to build and tear down on the 2-core VM. */
    if (setpgid(0, 0) != 0) FAIL("setpgid: %s", strerror(errno));
    int landlock_fd = o->landlock_fd;
    if (place_fds(o, &landlock_fd, err, errlen)) return -1;
    fz_stamp(FZ_STAMP_child_fds);
    if (o->drop_to_uid >= 0) {
        uid_t id = (uid_t)o->drop_to_uid;
        if (setgroups(0, NULL) != 0 || setresgid(id, id, id) != 0 || setresuid(id, id, id) != 0)
            FAIL("dropping to uid %ld: %s", o->drop_to_uid, strerror(errno));
        /* The uid change made the process dumpable again; keeping the uid, it still has the
         * zygote's "not dumpable" (fz_confine_zygote), which fork carries over. */
        if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) FAIL("PR_SET_DUMPABLE: %s", strerror(errno));
    }
    if (set_limits(o, err, errlen)) return -1;
    fz_stamp(FZ_STAMP_child_limits);
    /* Set after the uid change, which clears it; if the zygote died in between, leave now. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0) FAIL("PR_SET_PDEATHSIG: %s", strerror(errno));
    if (getppid() != parent) _exit(1);
    fz_stamp(FZ_STAMP_child_prctl);
    if (landlock_fd >= 0) {
        if (syscall(__NR_landlock_restrict_self, landlock_fd, 0) != 0)
            FAIL("landlock_restrict_self: %s", strerror(errno));
        close(landlock_fd);
    }
    fz_stamp(FZ_STAMP_child_landlock);
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) != 0) FAIL("sigaction(SIGSYS): %s", strerror(errno));
    sigset_t sys;
    sigemptyset(&sys);
    sigaddset(&sys, SIGSYS);
    sigprocmask(SIG_UNBLOCK, &sys, NULL);
    fz_stamp(FZ_STAMP_child_sigsys);
    if (install_child_program(err, errlen)) return -1;
    fz_stamp(FZ_STAMP_child_seccomp);
    return 0;
}

int fz_confine_zygote(enum fz_backend backend, char *err, size_t errlen) {
    static struct sock_filter zygote_program[FZ_MAX_INSNS];
    child_length = build(backend, FZ_STAGE_CHILD, FZ_PID_PLACEHOLDER, child_program, err, errlen);
    if (child_length < 0) return -1;
    int n = build(backend, FZ_STAGE_ZYGOTE, getpid(), zygote_program, err, errlen);
    if (n < 0) return -1;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) FAIL("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
    /* Not dumpable: /proc/<zygote>/{mem,environ,maps} become root's, so a child of the same
     * uid cannot read the zygote (where Landlock does not already hide /proc). */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) FAIL("PR_SET_DUMPABLE: %s", strerror(errno));
    return install(zygote_program, n, err, errlen);
}
