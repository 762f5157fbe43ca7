/* What a sandboxed CPython may do once its job starts: compute, read files the kernel and
 * Landlock let it open read-only, write to the pipes it already holds, and exit. */
#include "policy.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <termios.h>

#define NAME(n) {#n, __NR_##n}
#define ALLOW(n) {#n, __NR_##n, FZ_ALLOW, 0, {0}, 0}

/* O_TMPFILE is __O_TMPFILE | O_DIRECTORY; masking __O_TMPFILE alone keeps plain directory
 * opens (os.listdir, imports) allowed. */
#define WRITE_FLAGS (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | (O_TMPFILE & ~O_DIRECTORY))

const struct fz_rule fz_rules[] = {
    /* Hot path first: the linear BPF chain costs a compare per rule passed. */
    ALLOW(read), ALLOW(write), ALLOW(mmap), ALLOW(munmap), ALLOW(brk), ALLOW(mremap),
    ALLOW(madvise), ALLOW(mprotect), ALLOW(futex), ALLOW(clock_gettime), ALLOW(close),
    ALLOW(fstat), ALLOW(newfstatat), ALLOW(statx), ALLOW(lseek), ALLOW(readv), ALLOW(writev),
    ALLOW(pread64), ALLOW(preadv), ALLOW(getdents64), ALLOW(readlinkat), ALLOW(getcwd),
    ALLOW(faccessat), ALLOW(faccessat2), ALLOW(fstatfs), ALLOW(statfs),
    ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn), ALLOW(sigaltstack), ALLOW(restart_syscall),
    ALLOW(getpid), ALLOW(gettid), ALLOW(getppid), ALLOW(getuid), ALLOW(geteuid),
    ALLOW(getgid), ALLOW(getegid), ALLOW(getgroups), ALLOW(getpgid), ALLOW(getsid),
    ALLOW(getrandom), ALLOW(clock_getres), ALLOW(gettimeofday), ALLOW(clock_nanosleep),
    ALLOW(nanosleep), ALLOW(sched_yield), ALLOW(sched_getaffinity), ALLOW(getcpu),
    ALLOW(getrusage), ALLOW(times), ALLOW(uname), ALLOW(sysinfo), ALLOW(ppoll),
    ALLOW(pselect6), ALLOW(dup), ALLOW(dup3), ALLOW(set_robust_list), ALLOW(rseq),
    ALLOW(exit), ALLOW(exit_group),
#ifdef __NR_stat
    ALLOW(stat), ALLOW(lstat), ALLOW(readlink), ALLOW(access), ALLOW(dup2), ALLOW(poll),
    ALLOW(select), ALLOW(time), ALLOW(getrlimit), ALLOW(getpgrp),
#endif
    {"openat", __NR_openat, FZ_ARG_MASK_ZERO, 2, {WRITE_FLAGS}, 1},
#ifdef __NR_open
    {"open", __NR_open, FZ_ARG_MASK_ZERO, 1, {WRITE_FLAGS}, 1},
#endif
    {"kill", __NR_kill, FZ_ARG_EQ_SELF, 0, {0}, 0},
    {"tgkill", __NR_tgkill, FZ_ARG_EQ_SELF, 0, {0}, 0},
    {"tkill", __NR_tkill, FZ_ARG_EQ_SELF, 0, {0}, 0},
    {"rt_sigaction", __NR_rt_sigaction, FZ_ARG_NE, 0, {SIGSYS}, 1},
    {"prlimit64", __NR_prlimit64, FZ_ARG_NULL, 2, {0}, 0},
    {"ioctl", __NR_ioctl, FZ_ARG_IN, 1, {TCGETS, FIOCLEX, FIONCLEX}, 3},
    /* F_SETPIPE_SZ: the zygote sizes result pipes; a capability-less child stays under
     * /proc/sys/fs/pipe-max-size. */
    {"fcntl", __NR_fcntl, FZ_ARG_IN, 1,
     {F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD, F_DUPFD_CLOEXEC, F_GETPIPE_SZ, F_SETPIPE_SZ}, 8},
};
const size_t fz_nrules = sizeof(fz_rules) / sizeof(fz_rules[0]);

const struct fz_syscall_name fz_denied_names[] = {
    NAME(socket), NAME(socketpair), NAME(landlock_create_ruleset), NAME(landlock_add_rule),
    NAME(capset), NAME(setgroups), NAME(close_range), NAME(connect), NAME(bind), NAME(listen), NAME(accept4),
    NAME(sendto), NAME(recvfrom), NAME(sendmsg), NAME(recvmsg), NAME(clone), NAME(clone3),
    NAME(execve), NAME(execveat), NAME(ptrace), NAME(process_vm_readv),
    NAME(process_vm_writev), NAME(io_uring_setup), NAME(io_uring_enter),
    NAME(io_uring_register), NAME(openat2), NAME(mkdirat), NAME(unlinkat), NAME(renameat),
    NAME(renameat2), NAME(linkat), NAME(symlinkat), NAME(fchmod), NAME(fchmodat),
    NAME(fchown), NAME(fchownat), NAME(truncate), NAME(ftruncate), NAME(mount),
    NAME(umount2), NAME(chroot), NAME(pivot_root), NAME(setuid), NAME(setgid),
    NAME(setresuid), NAME(setresgid), NAME(setrlimit), NAME(prctl), NAME(seccomp), NAME(bpf),
    NAME(perf_event_open), NAME(userfaultfd), NAME(memfd_create), NAME(unshare), NAME(setns),
    NAME(pidfd_open), NAME(pidfd_getfd), NAME(pidfd_send_signal), NAME(pipe2),
    NAME(eventfd2), NAME(epoll_create1), NAME(inotify_init1), NAME(mknodat), NAME(setsid),
    NAME(setpgid), NAME(sched_setaffinity), NAME(setpriority), NAME(keyctl), NAME(add_key),
    NAME(personality), NAME(fsync), NAME(flock), NAME(chdir), NAME(fchdir), NAME(utimensat),
    NAME(wait4), NAME(waitid), NAME(mlock), NAME(sync),
#ifdef __NR_fork
    NAME(fork), NAME(vfork), NAME(creat), NAME(mkdir), NAME(rmdir), NAME(unlink),
    NAME(rename), NAME(link), NAME(symlink), NAME(chmod), NAME(chown), NAME(pipe),
    NAME(epoll_create), NAME(eventfd), NAME(inotify_init), NAME(arch_prctl), NAME(iopl),
    NAME(ioperm), NAME(mknod), NAME(alarm),
#endif
};
const size_t fz_ndenied_names = sizeof(fz_denied_names) / sizeof(fz_denied_names[0]);

/* Calls the zygote makes after its own filter is on: forking, reaping and hardening children. */
const struct fz_syscall_name fz_zygote_extra[] = {
    NAME(clone), NAME(wait4), NAME(waitid), NAME(pidfd_open), NAME(pipe2),
    /* the signal calls are here for their child rule: "own pid only" must name the child's pid,
     * which only the child-stage program carries (the zygote's compares with the zygote's) */
    NAME(kill), NAME(tgkill), NAME(tkill),
    NAME(setpgid), NAME(close_range), NAME(prlimit64), NAME(setrlimit),
    NAME(prctl), NAME(landlock_restrict_self), NAME(seccomp),
    NAME(rt_sigaction), NAME(setgroups), NAME(setresgid), NAME(setresuid),
};
const size_t fz_nzygote_extra = sizeof(fz_zygote_extra) / sizeof(fz_zygote_extra[0]);

const struct fz_rule *fz_child_rule(int nr) {
    for (size_t i = 0; i < fz_nrules; i++)
        if (fz_rules[i].nr == nr) return &fz_rules[i];
    return NULL;
}

int fz_is_zygote_extra(int nr) {
    for (size_t i = 0; i < fz_nzygote_extra; i++)
        if (fz_zygote_extra[i].nr == nr) return 1;
    return 0;
}
