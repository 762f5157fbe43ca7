/* The same policy table through libseccomp, used where its headers exist (it also handles
 * multi-arch and x32 details itself). Built only with FASTAZR_HAVE_LIBSECCOMP. */
#include "policy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifdef FASTAZR_HAVE_LIBSECCOMP
#include <seccomp.h>

int fz_have_libseccomp(void) { return 1; }

/* Low 32 bits only: the kernel reads these arguments as int, whatever the upper register half. */
#define LOW32(arg, value) SCMP_CMP((unsigned)(arg), SCMP_CMP_MASKED_EQ, 0xffffffffu, (value))

static int add_rule(scmp_filter_ctx ctx, const struct fz_rule *r, pid_t self) {
    const uint32_t allow = SCMP_ACT_ALLOW;
    unsigned arg = (unsigned)r->arg;
    switch (r->kind) {
    case FZ_ALLOW:
        return seccomp_rule_add(ctx, allow, r->nr, 0);
    case FZ_ARG_MASK_ZERO:
        return seccomp_rule_add(ctx, allow, r->nr, 1, SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, r->values[0], 0));
    case FZ_ARG_EQ_SELF:
        return seccomp_rule_add(ctx, allow, r->nr, 1, LOW32(arg, (uint32_t)self));
    case FZ_ARG_NE:
        break; /* libseccomp has no 32-bit "not equal": such rules must be zygote extras */
    case FZ_ARG_IN:
        for (int i = 0; i < r->nvalues; i++) {
            int rc = seccomp_rule_add(ctx, allow, r->nr, 1, LOW32(arg, r->values[i]));
            if (rc != 0) return rc;
        }
        return 0;
    case FZ_ARG_NULL:
        return seccomp_rule_add(ctx, allow, r->nr, 1, SCMP_CMP(arg, SCMP_CMP_EQ, 0));
    }
    return -EINVAL;
}

/* The child stage starts from ALLOW (the zygote's filter is underneath) and traps each extra
 * call unless the child's own rule admits it, so conditions appear negated here. */
static int deny_extra(scmp_filter_ctx ctx, int nr, pid_t self) {
    const uint32_t trap = SCMP_ACT_TRAP;
    const struct fz_rule *r = fz_child_rule(nr);
    if (r == NULL) return seccomp_rule_add(ctx, trap, nr, 0);
    unsigned arg = (unsigned)r->arg;
    switch (r->kind) {
    case FZ_ALLOW: return 0;
    /* 64-bit "not equal": a pid with garbage in the upper half traps too, which is stricter */
    case FZ_ARG_EQ_SELF: return seccomp_rule_add(ctx, trap, nr, 1, SCMP_CMP(arg, SCMP_CMP_NE, (uint32_t)self));
    case FZ_ARG_NE: return seccomp_rule_add(ctx, trap, nr, 1, LOW32(arg, r->values[0]));
    case FZ_ARG_NULL: return seccomp_rule_add(ctx, trap, nr, 1, SCMP_CMP(arg, SCMP_CMP_NE, 0));
    case FZ_ARG_MASK_ZERO: case FZ_ARG_IN: break;
    }
    return -EINVAL; /* add a negation here before making such a call a zygote extra */
}

/* libseccomp builds the program; seccomp_export_bpf hands it back through a pipe (at most
 * FZ_MAX_INSNS * 8 = 8 KiB, within one pipe buffer) so it can be installed or patched later. */
static int export(scmp_filter_ctx ctx, struct sock_filter *out, unsigned cap, char *err, size_t errlen) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "pipe2: %s", strerror(errno));
        return -1;
    }
    int rc = seccomp_export_bpf(ctx, fds[1]);
    close(fds[1]);
    ssize_t n = rc == 0 ? read(fds[0], out, (size_t)cap * sizeof(*out)) : -1;
    close(fds[0]);
    if (rc != 0 || n <= 0 || n % (ssize_t)sizeof(*out) != 0 || n == (ssize_t)(cap * sizeof(*out))) {
        snprintf(err, errlen, "seccomp_export_bpf failed (%d) or its program exceeds %u instructions", rc, cap);
        return -1;
    }
    return (int)(n / (ssize_t)sizeof(*out));
}

int fz_program_libseccomp(enum fz_stage stage, pid_t self, struct sock_filter *out, unsigned cap, char *err,
                          size_t errlen) {
    scmp_filter_ctx ctx = seccomp_init(stage == FZ_STAGE_ZYGOTE ? SCMP_ACT_TRAP : SCMP_ACT_ALLOW);
    if (ctx == NULL) {
        snprintf(err, errlen, "seccomp_init failed");
        return -1;
    }
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    for (size_t i = 0; rc == 0 && i < fz_nzygote_extra; i++) {
        int nr = fz_zygote_extra[i].nr;
        rc = stage == FZ_STAGE_ZYGOTE ? seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) : deny_extra(ctx, nr, self);
        if (rc != 0) snprintf(err, errlen, "seccomp_rule_add(%s): %s", fz_zygote_extra[i].name, strerror(-rc));
    }
    for (size_t i = 0; stage == FZ_STAGE_ZYGOTE && rc == 0 && i < fz_nrules; i++) {
        if (fz_is_zygote_extra(fz_rules[i].nr)) continue;
        rc = add_rule(ctx, &fz_rules[i], self);
        if (rc != 0) snprintf(err, errlen, "seccomp_rule_add(%s): %s", fz_rules[i].name, strerror(-rc));
    }
    int n = rc == 0 ? export(ctx, out, cap, err, errlen) : -1;
    seccomp_release(ctx);
    return n;
}

#else

int fz_have_libseccomp(void) { return 0; }

int fz_program_libseccomp(enum fz_stage stage, pid_t self, struct sock_filter *out, unsigned cap, char *err,
                          size_t errlen) {
    (void)stage;
    (void)self;
    (void)out;
    (void)cap;
    snprintf(err, errlen,
             "fastazr was built without libseccomp (no seccomp.h): use seccomp_backend='bpf' or "
             "install libseccomp-dev and reinstall");
    return -1;
}

#endif
