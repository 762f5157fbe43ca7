/* The policy table assembled into a classic-BPF seccomp program by hand, so the sandbox builds
 * where libseccomp's headers are missing. Each rule is "jeq nr" followed by a short block that
 * always returns, so no jump spans more than a few instructions (BPF jumps reach 255). */
#include "policy.h"

#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/syscall.h>

#if defined(__x86_64__)
#define FZ_AUDIT_ARCH AUDIT_ARCH_X86_64
#define FZ_X32_BIT 0x40000000u
#elif defined(__aarch64__)
#define FZ_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "fastazr's seccomp policy covers x86_64 and aarch64 only"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "argument offsets below assume a little-endian seccomp_data"
#endif

#define ARG_LO(i) ((uint32_t)(offsetof(struct seccomp_data, args) + 8 * (i)))
#define ARG_HI(i) (ARG_LO(i) + 4)

struct program {
    struct sock_filter *insns;
    unsigned n, cap;
};

static void emit(struct program *p, uint16_t code, uint8_t jt, uint8_t jf, uint32_t k) {
    if (p->n < p->cap) p->insns[p->n] = (struct sock_filter)BPF_JUMP(code, k, jt, jf);
    p->n++;
}

static void ret(struct program *p, uint32_t action) { emit(p, BPF_RET | BPF_K, 0, 0, action); }
static void load(struct program *p, uint32_t offset) { emit(p, BPF_LD | BPF_W | BPF_ABS, 0, 0, offset); }

/* Each block runs only after its "jeq nr" matched and every path through it returns, so when
 * the jeq skips it, A still holds nr for the next rule. */
static unsigned block_length(const struct fz_rule *r) {
    switch (r->kind) {
    case FZ_ARG_MASK_ZERO: case FZ_ARG_EQ_SELF: case FZ_ARG_NE: return 4;
    case FZ_ARG_IN: return 1 + (unsigned)r->nvalues + 2;
    case FZ_ARG_NULL: return 6;
    default: return 1;
    }
}

static void block(struct program *p, const struct fz_rule *r, pid_t self) {
    const uint32_t allow = SECCOMP_RET_ALLOW, trap = SECCOMP_RET_TRAP;
    switch (r->kind) {
    case FZ_ALLOW:
        ret(p, allow);
        return;
    case FZ_ARG_MASK_ZERO:
        load(p, ARG_LO(r->arg));
        emit(p, BPF_JMP | BPF_JSET | BPF_K, 0, 1, r->values[0]);
        ret(p, trap);
        ret(p, allow);
        return;
    case FZ_ARG_EQ_SELF:
        load(p, ARG_LO(r->arg));
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (uint32_t)self);
        ret(p, allow);
        ret(p, trap);
        return;
    case FZ_ARG_NE:
        load(p, ARG_LO(r->arg));
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, r->values[0]);
        ret(p, trap);
        ret(p, allow);
        return;
    case FZ_ARG_IN:
        load(p, ARG_LO(r->arg));
        for (int i = 0; i < r->nvalues; i++)
            emit(p, BPF_JMP | BPF_JEQ | BPF_K, (uint8_t)(r->nvalues - i), 0, r->values[i]);
        ret(p, trap);
        ret(p, allow);
        return;
    case FZ_ARG_NULL:
        load(p, ARG_LO(r->arg));
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 3, 0);
        load(p, ARG_HI(r->arg));
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0);
        ret(p, allow);
        ret(p, trap);
        return;
    }
}

/* Zygote stage: the child policy, with the zygote's extra calls allowed outright. */
static void zygote_program(struct program *p, pid_t self) {
    load(p, offsetof(struct seccomp_data, arch));
    emit(p, BPF_JMP | BPF_JEQ | BPF_K, 1, 0, FZ_AUDIT_ARCH);
    ret(p, SECCOMP_RET_KILL_PROCESS);
    load(p, offsetof(struct seccomp_data, nr));
#ifdef FZ_X32_BIT
    emit(p, BPF_JMP | BPF_JSET | BPF_K, 0, 1, FZ_X32_BIT);
    ret(p, SECCOMP_RET_KILL_PROCESS);
#endif
    for (size_t i = 0; i < fz_nzygote_extra; i++) {
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, 1, (uint32_t)fz_zygote_extra[i].nr);
        ret(p, SECCOMP_RET_ALLOW);
    }
    for (size_t i = 0; i < fz_nrules; i++) {
        if (fz_is_zygote_extra(fz_rules[i].nr)) continue;
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, (uint8_t)block_length(&fz_rules[i]), (uint32_t)fz_rules[i].nr);
        block(p, &fz_rules[i], self);
    }
    ret(p, SECCOMP_RET_TRAP);
}

/* Child stage: runs after the zygote's filter, so it only takes the extras away again. Calls
 * the child may not make at all jump straight to one shared trap at the end. */
static void child_program(struct program *p, pid_t self) {
    unsigned denied = 0, conditional_len = 0;
    for (size_t i = 0; i < fz_nzygote_extra; i++) {
        const struct fz_rule *r = fz_child_rule(fz_zygote_extra[i].nr);
        if (r == NULL) denied++;
        else conditional_len += 1 + block_length(r);
    }
    load(p, offsetof(struct seccomp_data, nr));
    unsigned k = 0;
    for (size_t i = 0; i < fz_nzygote_extra; i++) {
        if (fz_child_rule(fz_zygote_extra[i].nr) != NULL) continue;
        /* distance to the trap: the remaining denies, the conditional rules, the allow */
        unsigned jump = (denied - k - 1) + conditional_len + 1;
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, (uint8_t)jump, 0, (uint32_t)fz_zygote_extra[i].nr);
        k++;
    }
    for (size_t i = 0; i < fz_nzygote_extra; i++) {
        const struct fz_rule *r = fz_child_rule(fz_zygote_extra[i].nr);
        if (r == NULL) continue;
        emit(p, BPF_JMP | BPF_JEQ | BPF_K, 0, (uint8_t)block_length(r), (uint32_t)r->nr);
        block(p, r, self);
    }
    ret(p, SECCOMP_RET_ALLOW);
    ret(p, SECCOMP_RET_TRAP);
}

int fz_program_bpf(enum fz_stage stage, pid_t self, struct sock_filter *out, unsigned cap, char *err, size_t errlen) {
    struct program p = {out, 0, cap};
    if (stage == FZ_STAGE_ZYGOTE) zygote_program(&p, self);
    else child_program(&p, self);
    if (p.n > cap) {
        snprintf(err, errlen, "seccomp program needs %u instructions, buffer holds %u", p.n, cap);
        return -1;
    }
    return (int)p.n;
}
