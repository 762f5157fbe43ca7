/* The same policy table through libseccomp, used where its headers exist (it also handles
 * multi-arch and x32 details itself). Built only with FASTAZR_HAVE_LIBSECCOMP. */
#include "policy.h"

#include <stdio.h>
#include <string.h>

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
        return seccomp_rule_add(ctx, allow, r->nr, 1, SCMP_CMP(arg, SCMP_CMP_NE, r->values[0]));
    case FZ_ARG_IN:
        for (int i = 0; i < r->nvalues; i++) {
            int rc = seccomp_rule_add(ctx, allow, r->nr, 1, LOW32(arg, r->values[i]));
            if (rc != 0) return rc;
        }
        return 0;
    case FZ_ARG_NULL:
        return seccomp_rule_add(ctx, allow, r->nr, 1, SCMP_CMP(arg, SCMP_CMP_EQ, 0));
    }
    return -1;
}

int fz_install_filter_libseccomp(pid_t self, char *err, size_t errlen) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
    if (ctx == NULL) {
        snprintf(err, errlen, "seccomp_init failed");
        return -1;
    }
    int rc = seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS);
    for (size_t i = 0; rc == 0 && i < fz_nrules; i++) {
        rc = add_rule(ctx, &fz_rules[i], self);
        if (rc != 0) snprintf(err, errlen, "seccomp_rule_add(%s): %s", fz_rules[i].name, strerror(-rc));
    }
    if (rc == 0 && (rc = seccomp_load(ctx)) != 0)
        snprintf(err, errlen, "seccomp_load: %s", strerror(-rc));
    seccomp_release(ctx);
    return rc == 0 ? 0 : -1;
}

#else

int fz_have_libseccomp(void) { return 0; }

int fz_install_filter_libseccomp(pid_t self, char *err, size_t errlen) {
    (void)self;
    snprintf(err, errlen,
             "fastazr was built without libseccomp (no seccomp.h): use seccomp_backend='bpf' or "
             "install libseccomp-dev and reinstall");
    return -1;
}

#endif
