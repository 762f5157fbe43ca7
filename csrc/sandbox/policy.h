/* The syscall policy of a sandboxed child: one table, read by both filter builders.
 *
 * Default deny. A denied call raises SIGSYS (SECCOMP_RET_TRAP); the child's handler writes a
 * violation frame naming the syscall and exits, so every denial is reported, never silent.
 * Calls of the wrong architecture (i386, x32) kill the process outright.
 *
 * Two stages, because installing a filter costs the kernel ~3 us per BPF instruction (0.3 ms
 * for the full ~130-instruction policy, measured on the 2-core dev VM, as much as a fork): the
 * zygote installs the full default-deny policy once, widened by the few calls it needs to
 * fork and harden children (fz_zygote_extra); every child inherits it and then installs a
 * ~40-instruction filter that takes exactly those calls away again. */
#ifndef FASTAZR_POLICY_H
#define FASTAZR_POLICY_H

#include <stddef.h>
#include <stdint.h>
#include <linux/filter.h>
#include <sys/syscall.h>
#include <sys/types.h>

#ifndef __NR_landlock_create_ruleset /* headers older than Linux 5.13; numbers are generic */
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif

enum fz_rule_kind {
    FZ_ALLOW,          /* always allowed */
    FZ_ARG_MASK_ZERO,  /* allowed when (arg & value) == 0: open flags without any write bit */
    FZ_ARG_EQ_SELF,    /* allowed when arg == the child's own pid: signals to itself only */
    FZ_ARG_NE,         /* allowed when arg != value: any signal handler but SIGSYS's */
    FZ_ARG_IN,         /* allowed when arg is one of values[0..nvalues) */
    FZ_ARG_NULL,       /* allowed when the 64-bit pointer arg is NULL: prlimit64 reads only */
};

struct fz_rule {
    const char *name;
    int nr;
    enum fz_rule_kind kind;
    int arg;
    uint32_t values[8];
    int nvalues;
};

struct fz_syscall_name {
    const char *name;
    int nr;
};

enum fz_stage { FZ_STAGE_ZYGOTE, FZ_STAGE_CHILD };

extern const struct fz_rule fz_rules[];
extern const size_t fz_nrules;
/* Denied calls named for reports; a number missing here is reported as "syscall N". */
extern const struct fz_syscall_name fz_denied_names[];
extern const size_t fz_ndenied_names;

extern const struct fz_syscall_name fz_zygote_extra[];
extern const size_t fz_nzygote_extra;

/* The child's rule for nr, or NULL when the child may not make that call at all. */
const struct fz_rule *fz_child_rule(int nr);
int fz_is_zygote_extra(int nr);

/* A pid no process can have (pid_max is at most 2^22): the child program is built once, in the
 * zygote, with this in its signal-yourself-only rules, and each child patches in its own pid. */
#define FZ_PID_PLACEHOLDER 0x7ffffffe
#define FZ_MAX_INSNS 1024

/* One stage's program into out[0..cap). Returns its length, or -1 with a message in err.
 * self is the pid the signal rules compare with. */
int fz_program_bpf(enum fz_stage stage, pid_t self, struct sock_filter *out, unsigned cap, char *err, size_t errlen);
int fz_program_libseccomp(enum fz_stage stage, pid_t self, struct sock_filter *out, unsigned cap, char *err,
                          size_t errlen);
int fz_have_libseccomp(void);

#endif
