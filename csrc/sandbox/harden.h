/* Turning a freshly forked zygote child into a sandboxed one, before any job code runs. */
#ifndef FASTAZR_HARDEN_H
#define FASTAZR_HARDEN_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Fixed descriptor numbers inside a child: the Python runner relies on them. */
enum { FZ_FD_STDIN = 0, FZ_FD_STDOUT = 1, FZ_FD_STDERR = 2, FZ_FD_RESULT = 3 };

enum fz_backend { FZ_BACKEND_BPF = 0, FZ_BACKEND_LIBSECCOMP = 1 };

struct fz_harden_opts {
    int result_fd, stdout_fd, stderr_fd, devnull_fd;
    int landlock_fd;          /* a prepared ruleset, or -1 */
    const char *workdir;
    uint64_t address_space;   /* bytes */
    uint64_t cpu_seconds;     /* per child: the batch's timeout + 2 s */
    uint64_t cpu_seconds_max; /* the hard RLIMIT_CPU a child inherits (fz_prepare_zygote) */
    uint64_t open_files;
    long drop_to_uid;         /* -1 keeps the uid; otherwise uid and gid become this */
};

/* In the zygote, once, before it forks: what every child would otherwise set for itself and
 * the zygote can carry (workdir, the limits it can live under, no capabilities when root
 * keeps its uid), the child's own limits clamped to the hard ones it will inherit, and the
 * /dev/null and Landlock descriptors moved above the ones a child places. Moved out of
 * fz_harden, it saved 22 syscalls a child (~15 us on the 2-core dev VM). */
int fz_prepare_zygote(struct fz_harden_opts *o, char *err, size_t errlen);

/* In a child of a prepared, confined zygote: the whole sequence, ending with the child-stage
 * filter that fz_confine_zygote prepared. */
int fz_harden(const struct fz_harden_opts *o, char *err, size_t errlen);

/* In the zygote, once, after its imports: build both stages' programs with the backend,
 * then no_new_privs and the zygote-stage filter. */
int fz_confine_zygote(enum fz_backend backend, char *err, size_t errlen);

/* Landlock: the kernel's ABI version (0 when absent) and a ruleset allowing reads beneath
 * paths, writes nowhere, no TCP, and (ABI >= 6) no signals or abstract sockets outside. */
int fz_landlock_abi(void);
int fz_landlock_ruleset(const char *const *paths, size_t npaths, char *err, size_t errlen);

#endif
