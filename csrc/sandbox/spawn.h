/* One job's whole life as the zygote sees it: pipes, fork, harden the child, supervise it. */
#ifndef FASTAZR_SPAWN_H
#define FASTAZR_SPAWN_H

#include "harden.h"
#include "supervise.h"

struct fz_spawn_config {
    struct fz_harden_opts harden; /* the pipe fds and the CPU limit in it are filled per child */
    size_t output_cap, result_cap;
    size_t result_pipe_capacity;  /* 0: the kernel's default, and the result pipe is watched */
};

/* Fork a hardened child. Returns 0 in the child (ready to run its job), 1 in the zygote once
 * the child is gone (outcome filled in), -1 on failure with errno set. A child whose hardening
 * fails sends a "setup" frame with the reason and exits with status 70. */
int fz_spawn(const struct fz_spawn_config *c, double timeout_s, uint64_t cpu_seconds, struct fz_outcome *o);

#endif
