/* The zygote's side of one job: watch a child until it exits or must be killed. In C, because
 * the zygote's pages are shared copy-on-write with the child while it runs: every page the
 * zygote writes meanwhile gets copied (measured: Python's poll loop here cost ~0.5 ms per job
 * in page faults on the 2-core dev VM). This loop writes a few stack and buffer pages only. */
#ifndef FASTAZR_SUPERVISE_H
#define FASTAZR_SUPERVISE_H

#include <stddef.h>
#include <sys/types.h>

struct fz_buffer {
    char *data;
    size_t len, cap, limit;
};

enum fz_killed { FZ_NOT_KILLED = 0, FZ_KILLED_TIMEOUT = 1, FZ_KILLED_OUTPUT = 2 };

struct fz_outcome {
    enum fz_killed killed;
    int wait_status;
    double cpu_seconds, duration_s;
    struct fz_buffer result, out, err;
};

/* Takes ownership of the descriptors (closes them). With watch_result 0 the result pipe is
 * read only after the child exits (its capacity must hold result_cap). A child killed for
 * time or output is reaped if it exits within KILLED_WAIT_MS (supervise.c), else left dying,
 * to be reaped by fz_reap_dying; either way its wait_status and CPU time stay 0. The outcome's
 * buffers point into the regions fz_reserve_outputs reserved for these caps (call it first).
 * Returns 0, or -1 with errno set. */
int fz_supervise(pid_t pid, int pidfd, int result_fd, int out_fd, int err_fd, double timeout_s,
                 size_t output_cap, size_t result_cap, int watch_result, struct fz_outcome *o);

/* Reserve where fz_supervise puts a child's result (result_cap + 1 bytes) and outputs
 * (output_cap + 1 each), once per zygote. Returns 0, or -1 with errno set. */
int fz_reserve_outputs(size_t output_cap, size_t result_cap);

/* Wipes what the outcome's buffers hold (they point into the reserved regions). */
void fz_outcome_free(struct fz_outcome *o);

/* Wait for every child fz_supervise killed and left dying. */
void fz_reap_dying(void);

#endif
