/* The zygote's per-job path in one C call: everything Python did here (pipes, fork, closes,
 * pidfd, the harden and supervise calls) wrote pages shared with the child and so cost
 * copy-on-write faults. */
#include "spawn.h"

#include "bump.h"
#include "scrub.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* *watch: the result pipe must be polled, as it could not be made big enough for any result. */
static int child_pipes(size_t result_capacity, int fds[6], int *watch) {
    for (int i = 0; i < 3; i++) {
        if (pipe2(fds + 2 * i, O_CLOEXEC) != 0) {
            for (int j = 0; j < 2 * i; j++) close(fds[j]);
            return -1;
        }
    }
    /* Big enough for any allowed result, so the child never blocks on it (see fz_supervise).
     * EPERM: the uid's pipe-buffer quota (pipe-user-pages-soft, shared by every process of the
     * uid) is spent and no capability lifts it; a watched pipe of the default size still works. */
    *watch = result_capacity == 0;
    if (result_capacity > 0 && fcntl(fds[1], F_SETPIPE_SZ, (int)result_capacity) < 0) {
        if (errno != EPERM) {
            for (int j = 0; j < 6; j++) close(fds[j]);
            return -1;
        }
        *watch = 1;
    }
    return 0;
}

/* Whether fd is the write end of a pipe: fd 3 is the result pipe once fz_harden has placed
 * the descriptors; before that it is whatever the zygote had there (never a pipe writer). */
static int is_pipe_writer(int fd) {
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_ACCMODE) == O_WRONLY && fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode);
}

/* The "setup" frame of fastazr/sandbox/protocol.py: status byte 5, empty value, the reason. */
static void report_setup_failure(int result_fd, const char *reason) {
    size_t n = strlen(reason);
    unsigned char frame[300];
    if (n > sizeof(frame) - 9) n = sizeof(frame) - 9;
    uint32_t body = (uint32_t)(5 + n);
    unsigned char head[9] = {(unsigned char)(body >> 24), (unsigned char)(body >> 16), (unsigned char)(body >> 8),
                             (unsigned char)body, 5, 0, 0, 0, 0};
    memcpy(frame, head, 9);
    memcpy(frame + 9, reason, n);
    int fd = is_pipe_writer(FZ_FD_RESULT) ? FZ_FD_RESULT : result_fd;
    ssize_t unused = write(fd, frame, 9 + n);
    (void)unused;
}

struct fz_trace *fz_trace;

int fz_spawn(const struct fz_spawn_config *c, double timeout_s, uint64_t cpu_seconds, struct fz_outcome *o) {
    fz_stamp(FZ_STAMP_spawn_enter);
    fz_reap_dying(); /* the last killed child has had a whole job's setup to finish dying */
    int fds[6], watch;
    if (child_pipes(c->result_pipe_capacity, fds, &watch) != 0) return -1;
    fz_stamp(FZ_STAMP_pipes_made);
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        for (int j = 0; j < 6; j++) close(fds[j]);
        errno = saved;
        return -1;
    }
    if (pid == 0) {
        fz_scrub_child();
        fz_stamp(FZ_STAMP_child_start);
        struct fz_harden_opts h = c->harden;
        h.result_fd = fds[1];
        h.stdout_fd = fds[3];
        h.stderr_fd = fds[5];
        h.cpu_seconds = cpu_seconds;
        char err[256] = "sandbox setup failed: ";
        size_t head = strlen(err);
        if (fz_harden(&h, err + head, sizeof(err) - head) != 0) {
            report_setup_failure(fds[1], err);
            _exit(70);
        }
        fz_bump_install();
        return 0;
    }
    fz_stamp(FZ_STAMP_forked);
    close(fds[1]);
    close(fds[3]);
    close(fds[5]);
    int pidfd = (int)syscall(__NR_pidfd_open, pid, 0);
    if (pidfd < 0) {
        int saved = errno;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        close(fds[0]);
        close(fds[2]);
        close(fds[4]);
        errno = saved;
        return -1;
    }
    fz_stamp(FZ_STAMP_supervising);
    if (fz_supervise(pid, pidfd, fds[0], fds[2], fds[4], timeout_s, c->output_cap, c->result_cap, watch, o) != 0)
        return -1;
    return 1;
}
