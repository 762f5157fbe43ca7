/* The syscall policy of a sandboxed child: one table, read by both filter builders.
 *
 * Default deny. A denied call raises SIGSYS (SECCOMP_RET_TRAP); the child's handler writes a
 * violation frame naming the syscall and exits, so every denial is reported, never silent.
 * Calls of the wrong architecture (i386, x32) kill the process outright. */
#ifndef FASTAZR_POLICY_H
#define FASTAZR_POLICY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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
    uint32_t values[6];
    int nvalues;
};

struct fz_syscall_name {
    const char *name;
    int nr;
};

extern const struct fz_rule fz_rules[];
extern const size_t fz_nrules;
/* Denied calls named for reports; a number missing here is reported as "syscall N". */
extern const struct fz_syscall_name fz_denied_names[];
extern const size_t fz_ndenied_names;

/* Install the filter on the calling thread. Return 0, or -1 with a message in err. */
int fz_install_filter_bpf(pid_t self, char *err, size_t errlen);
int fz_install_filter_libseccomp(pid_t self, char *err, size_t errlen);
int fz_have_libseccomp(void);

#endif
