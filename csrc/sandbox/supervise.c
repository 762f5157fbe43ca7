#include "supervise.h"

#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Where a running child's result and output land: one region per stream, reserved once
 * (fz_reserve_outputs) in memory no child inherits (MADV_DONTFORK), so no child ever sees an
 * earlier job's output, and writing there copies nothing. Output read into the heap while the
 * child lived made the zygote copy that heap page, and split its mapping of the heap's huge
 * page (stash.c) for good. */
static struct fz_buffer regions[3];

int fz_reserve_outputs(size_t output_cap, size_t result_cap) {
    size_t caps[3] = {result_cap + 1, output_cap + 1, output_cap + 1};
    for (int i = 0; i < 3; i++) {
        if (regions[i].data != NULL && regions[i].cap >= caps[i]) continue;
        if (regions[i].data != NULL) munmap(regions[i].data, regions[i].cap);
        regions[i].data = NULL;
        regions[i].cap = 0; /* empty until a reservation succeeds (configure refuses spawn till then) */
        /* NORESERVE: no commit charge for the caps (2 x max_output_bytes), only for what is read */
        void *p = mmap(NULL, caps[i], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return -1;
        if (madvise(p, caps[i], MADV_DONTFORK) != 0) {
            int saved = errno;
            munmap(p, caps[i]);
            errno = saved;
            return -1;
        }
        regions[i].data = p;
        regions[i].cap = caps[i];
    }
    return 0;
}

/* Read what is available into b. Returns bytes read, 0 at end of file, -1 on error. Keeps
 * limit + 1 bytes at most (its region's size): one byte over is enough to know the limit was
 * passed. */
static ssize_t take(int fd, struct fz_buffer *b) {
    if (b->len > b->limit) {
        char sink[4096];
        ssize_t n = read(fd, sink, sizeof(sink));
        explicit_bzero(sink, sizeof(sink)); /* the zygote's stack: every later child inherits it */
        return n;
    }
    ssize_t n = read(fd, b->data + b->len, b->cap - b->len);
    if (n > 0) b->len += (size_t)n;
    return n;
}

static void drain(int fd, struct fz_buffer *b) {
    while (take(fd, b) > 0) {
    }
}

#define KILLED_WAIT_MS 20 /* how long a killed child may take to exit before it is left to die */

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
    struct fz_buffer *bufs[3] = {&o->result, &o->out, &o->err};
    size_t limits[3] = {result_cap, output_cap, output_cap};
    for (int i = 0; i < 3; i++) *bufs[i] = (struct fz_buffer){regions[i].data, 0, regions[i].cap, limits[i]};
    /* An unwatched result pipe is large enough for any allowed result, so the child never
     * blocks on it and the zygote is woken once, at exit, instead of also at the write (each
     * cross-CPU wakeup costs ~0.1-0.3 ms on the dev VM). Negative fds are skipped by poll. */
    struct pollfd fds[4] = {{watch_result ? result_fd : -result_fd - 1, POLLIN, 0}, {out_fd, POLLIN, 0},
                            {err_fd, POLLIN, 0}, {pidfd, POLLIN, 0}};
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
        /* Killed: the verdict is known now. While the child tears down its address space it
         * still maps the zygote's pages, and the zygote's next write into a huge page would
         * split the zygote's own mapping of it (all of them after one timeout, until
         * khugepaged merged them again ~10 s later). A small child is gone within ~0.3 ms
         * (2-core VM): waited for and reaped here, before the zygote's Python writes again. A
         * big one (a 512 MiB heap: 50 ms) must not count against "timeout + 100 ms": left to
         * fz_reap_dying. Then take what is already in the result pipe. */
        kill(pid, SIGKILL);
        o->duration_s = now() - start;
        struct pollfd gone = {pidfd, POLLIN, 0};
        int exited_now = poll(&gone, 1, KILLED_WAIT_MS) == 1;
        int flags = fcntl(result_fd, F_GETFL);
        if (flags >= 0 && fcntl(result_fd, F_SETFL, flags | O_NONBLOCK) == 0) drain(result_fd, &o->result);
        close_all(fds, pidfd);
        if (!exited_now) return remember_dying(pid);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        return 0;
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

#define RELEASE_BYTES ((size_t)64 << 10)

/* Wiped once Python has its copies (children never inherit the regions; wiped all the same). A
 * big output's pages are given back, zeroed, rather than kept dirty for the zygote's life (a
 * 40 MB print kept 40 MB resident); a small one's bytes are cleared where they are. */
void fz_outcome_free(struct fz_outcome *o) {
    struct fz_buffer *buffers[3] = {&o->result, &o->out, &o->err};
    for (int i = 0; i < 3; i++) {
        struct fz_buffer *b = buffers[i];
        if (b->data == NULL || b->len == 0) continue;
        size_t used = b->len < b->cap ? b->len : b->cap;
        size_t pages = (used + 4095) & ~(size_t)4095; /* the region is page-aligned */
        if (used <= RELEASE_BYTES || madvise(b->data, pages < b->cap ? pages : b->cap, MADV_DONTNEED) != 0)
            explicit_bzero(b->data, used);
    }
}
