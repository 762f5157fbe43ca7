#include "supervise.h"

#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Read what is available into b. Returns bytes read, 0 at end of file, -1 on error. Never
 * grows past limit + 1 bytes: one byte over is enough to know the limit was passed. */
static ssize_t take(int fd, struct fz_buffer *b) {
    if (b->len > b->limit) {
        char sink[4096];
        ssize_t n = read(fd, sink, sizeof(sink));
        explicit_bzero(sink, sizeof(sink)); /* the zygote's stack: every later child inherits it */
        return n;
    }
    if (b->cap - b->len < 512) {
        /* not realloc, which would leave the old copy of the output in freed heap memory */
        size_t cap = b->cap ? b->cap * 2 : 1024;
        char *grown = malloc(cap);
        if (grown == NULL) return -1;
        if (b->data) {
            memcpy(grown, b->data, b->len);
            explicit_bzero(b->data, b->cap);
            free(b->data);
        }
        b->data = grown;
        b->cap = cap;
    }
    ssize_t n = read(fd, b->data + b->len, b->cap - b->len);
    if (n > 0) b->len += (size_t)n;
    return n;
}

static void drain(int fd, struct fz_buffer *b) {
    while (take(fd, b) > 0) {
    }
}

/* Children killed and not yet reaped. A killed child cannot fork, so each is one zombie-to-be;
 * more than a few at once would mean the next spawn did not run fz_reap_dying. */
static pid_t dying[64];
static int ndying;

static int remember_dying(pid_t pid) {
    if (ndying == (int)(sizeof(dying) / sizeof(dying[0]))) {
        waitpid(pid, NULL, 0);
        return 0;
    }
    dying[ndying++] = pid;
    return 0;
}

void fz_reap_dying(void) {
    for (int i = 0; i < ndying; i++)
        while (waitpid(dying[i], NULL, 0) < 0 && errno == EINTR) {
        }
    ndying = 0;
}

static void close_all(struct pollfd fds[3], int pidfd) {
    for (int i = 0; i < 3; i++) close(fds[i].fd < 0 ? -fds[i].fd - 1 : fds[i].fd);
    close(pidfd);
}

int fz_supervise(pid_t pid, int pidfd, int result_fd, int out_fd, int err_fd, double timeout_s,
                 size_t output_cap, size_t result_cap, int watch_result, struct fz_outcome *o) {
    memset(o, 0, sizeof(*o));
    o->result.limit = result_cap;
    o->out.limit = output_cap;
    o->err.limit = output_cap;
    /* An unwatched result pipe is large enough for any allowed result, so the child never
     * blocks on it and the zygote is woken once, at exit, instead of also at the write (each
     * cross-CPU wakeup costs ~0.1-0.3 ms on the dev VM). Negative fds are skipped by poll. */
    struct pollfd fds[4] = {{watch_result ? result_fd : -result_fd - 1, POLLIN, 0}, {out_fd, POLLIN, 0},
                            {err_fd, POLLIN, 0}, {pidfd, POLLIN, 0}};
    struct fz_buffer *bufs[3] = {&o->result, &o->out, &o->err};
    double start = now(), deadline = start + timeout_s;
    int exited = 0;
    while (!exited) {
        double left = deadline - now();
        if (left <= 0) {
            o->killed = FZ_KILLED_TIMEOUT;
            break;
        }
        int ready = poll(fds, 4, (int)(left * 1000) + 1);
        if (ready < 0 && errno != EINTR) {
            int saved = errno;
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
            close_all(fds, pidfd);
            errno = saved;
            return -1;
        }
        for (int i = 0; i < 3 && ready > 0; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            if (take(fds[i].fd, bufs[i]) <= 0) fds[i].fd = -fds[i].fd - 1; /* poll skips negatives */
        }
        if (fds[3].revents & POLLIN) {
            fz_stamp(FZ_STAMP_exit_seen);
            exited = 1;
        }
        if (o->out.len + o->err.len > output_cap || o->result.len > result_cap) {
            o->killed = FZ_KILLED_OUTPUT;
            break;
        }
    }
    if (o->killed) {
        /* Killed: the verdict is known now, and tearing down a big address space can take
         * 50 ms (a 512 MiB heap), which must not count against "timeout + 100 ms". Take what
         * is already in the result pipe, and leave the corpse to fz_reap_dying. */
        kill(pid, SIGKILL);
        o->duration_s = now() - start;
        int flags = fcntl(result_fd, F_GETFL);
        if (flags >= 0 && fcntl(result_fd, F_SETFL, flags | O_NONBLOCK) == 0) drain(result_fd, &o->result);
        close_all(fds, pidfd);
        return remember_dying(pid);
    }
    struct rusage ru;
    while (wait4(pid, &o->wait_status, 0, &ru) < 0) {
        if (errno != EINTR) {
            int saved = errno;
            close_all(fds, pidfd);
            errno = saved;
            return -1;
        }
    }
    o->duration_s = now() - start;
    o->cpu_seconds = (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
                     ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) * 1e-6;
    /* Reaped, and it could not fork: no writer is left, so these reads end. */
    for (int i = 0; i < 3; i++) drain(fds[i].fd < 0 ? -fds[i].fd - 1 : fds[i].fd, bufs[i]);
    close_all(fds, pidfd);
    fz_stamp(FZ_STAMP_reaped);
    return 0;
}

/* Wiped, as every block the zygote frees (scrub.c): these hold the child's outputs. */
void fz_outcome_free(struct fz_outcome *o) {
    struct fz_buffer *buffers[3] = {&o->result, &o->out, &o->err};
    for (int i = 0; i < 3; i++) {
        if (buffers[i]->data) explicit_bzero(buffers[i]->data, buffers[i]->cap);
        free(buffers[i]->data);
    }
}
