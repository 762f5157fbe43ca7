/* fastazr._sandbox: the C half of the sandbox, called by the zygote (fastazr/sandbox/zygote.py).
 *
 *   configure(...)          what every child gets: limits, workdir, Landlock ruleset, caps; the
 *                           zygote takes on what children inherit (fz_prepare_zygote)
 *   confine_zygote(backend) the zygote's own filter: the child policy plus what forking needs
 *   spawn(timeout, cpu)     fork a hardened child; in the zygote, supervise it to the end
 *   reap()                  wait for the children spawn() killed
 *   send_result(...)        a child's one result frame, immune to the job's monkeypatching
 *   Stash                   byte strings the children never inherit (MADV_DONTFORK)
 *   huge_arena_bytes()      bytes of huge-page chunks holding this zygote's object arenas (stash.c)
 *   landlock_abi()          the kernel's Landlock ABI version, 0 when absent
 *   landlock_ruleset(paths) a ruleset fd allowing reads beneath paths only (built once per zygote)
 *   syscall_names()         {number: name} for every syscall the policy names
 *   stamp(i), trace_take()  per-stage stamps of a job when configure(trace=True) (trace.h)
 *   stamp_names()           the stamps' names, in index order
 *   refuse_code_objects()   an audit hook, inherited by children, refusing code objects a job builds
 *   wipe_freed_memory()     from now on the zygote wipes every block it frees (scrub.c)
 *   fork_compiler()         a raw fork for the process that compiles jobs' sources
 *   have_libseccomp()       whether this build can use libseccomp
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "harden.h"
#include "policy.h"
#include "scrub.h"
#include "spawn.h"
#include "trace.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

static int parse_backend(const char *name, enum fz_backend *out) {
    if (strcmp(name, "bpf") == 0) *out = FZ_BACKEND_BPF;
    else if (strcmp(name, "libseccomp") == 0) *out = FZ_BACKEND_LIBSECCOMP;
    else {
        PyErr_Format(PyExc_ValueError, "backend must be 'bpf' or 'libseccomp', got '%s'", name);
        return -1;
    }
    return 0;
}

static PyObject *py_confine_zygote(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    enum fz_backend backend;
    if (name == NULL || parse_backend(name, &backend) < 0) return NULL;
    char err[256] = {0};
    if (fz_confine_zygote(backend, err, sizeof(err)) != 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Encode text for a frame; NULL stands for no text. Returns a new bytes object or NULL. */
static PyObject *frame_text(PyObject *text) {
    if (text == Py_None) return PyBytes_FromStringAndSize("", 0);
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "send_result takes str or None");
        return NULL;
    }
    return PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
}

/* The child's one result frame (layout in fastazr/sandbox/protocol.py), written in C so that a
 * job which rebinds builtins (len, bytes, ...) or struct cannot break the runner's reply. */
static PyObject *py_send_result(PyObject *self, PyObject *args) {
    (void)self;
    int fd, status;
    PyObject *value, *error;
    if (!PyArg_ParseTuple(args, "iiOO", &fd, &status, &value, &error)) return NULL;
    PyObject *v = frame_text(value);
    PyObject *e = v ? frame_text(error) : NULL;
    if (e == NULL) {
        Py_XDECREF(v);
        return NULL;
    }
    size_t nv = (size_t)PyBytes_GET_SIZE(v), ne = (size_t)PyBytes_GET_SIZE(e);
    size_t body = 1 + 4 + nv + ne, total = 4 + body;
    unsigned char *frame = PyMem_Malloc(total);
    if (frame == NULL) {
        Py_DECREF(v);
        Py_DECREF(e);
        return PyErr_NoMemory();
    }
    frame[0] = (unsigned char)(body >> 24); frame[1] = (unsigned char)(body >> 16);
    frame[2] = (unsigned char)(body >> 8); frame[3] = (unsigned char)body;
    frame[4] = (unsigned char)status;
    frame[5] = (unsigned char)(nv >> 24); frame[6] = (unsigned char)(nv >> 16);
    frame[7] = (unsigned char)(nv >> 8); frame[8] = (unsigned char)nv;
    memcpy(frame + 9, PyBytes_AS_STRING(v), nv);
    memcpy(frame + 9 + nv, PyBytes_AS_STRING(e), ne);
    Py_DECREF(v);
    Py_DECREF(e);
    size_t done = 0;
    while (done < total) {
        ssize_t n = write(fd, frame + done, total - done);
        if (n <= 0) {
            PyMem_Free(frame);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        done += (size_t)n;
    }
    PyMem_Free(frame);
    Py_RETURN_NONE;
}

/* Set once per zygote (before confine_zygote): what every child gets. */
static struct fz_spawn_config spawn_config;
static int spawn_configured;

static PyObject *py_configure(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"devnull_fd", "workdir", "address_space", "open_files", "drop_to_uid",
                            "landlock_fd", "output_cap", "result_cap", "result_pipe_capacity", "trace", NULL};
    static PyObject *workdir; /* keeps the path string alive for the zygote's lifetime */
    struct fz_spawn_config c;
    memset(&c, 0, sizeof(c));
    PyObject *path;
    int trace = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iUKKlinnn|p", names, &c.harden.devnull_fd, &path,
                                     &c.harden.address_space, &c.harden.open_files,
                                     &c.harden.drop_to_uid, &c.harden.landlock_fd, &c.output_cap,
                                     &c.result_cap, &c.result_pipe_capacity, &trace))
        return NULL;
    /* uid_t is 32 bits: a larger value would wrap (2**32 to root), and (uid_t)-1 means
     * "unchanged" to setresuid. SandboxConfig refuses these first; this is the last word. */
    if (c.harden.drop_to_uid == 0 || c.harden.drop_to_uid < -1 || c.harden.drop_to_uid >= (long)(uid_t)-1) {
        PyErr_Format(PyExc_ValueError, "drop_to_uid must be -1 (keep the uid) or a uid from 1 to %ld, got %ld",
                     (long)(uid_t)-1 - 1, c.harden.drop_to_uid);
        return NULL;
    }
    if (trace && fz_trace == NULL) {
        void *page = mmap(NULL, sizeof(struct fz_trace), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (page == MAP_FAILED) return PyErr_SetFromErrno(PyExc_OSError);
        fz_trace = page;
    }
    c.harden.workdir = PyUnicode_AsUTF8(path);
    if (c.harden.workdir == NULL) return NULL;
    spawn_configured = 0; /* until this configuration is whole: the output regions fit its caps */
    if (fz_reserve_outputs(c.output_cap, c.result_cap) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    char err[256] = {0};
    if (fz_prepare_zygote(&c.harden, err, sizeof(err)) != 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    Py_INCREF(path);
    Py_XSETREF(workdir, path);
    spawn_config = c;
    spawn_configured = 1;
    Py_RETURN_NONE;
}

/* A raw fork(): Python's os.fork() re-initialises the runtime's locks and runs at-fork
 * callbacks in the child, which the single-threaded zygote does not need and which wrote ~170
 * pages there, each then copied on write: 220 faults per child against 47 (Python 3.11, dev
 * VM). The child goes on in Python after this returns None. */
static PyObject *py_spawn(PyObject *self, PyObject *args) {
    (void)self;
    double timeout_s;
    unsigned long long cpu_seconds;
    if (!PyArg_ParseTuple(args, "dK", &timeout_s, &cpu_seconds)) return NULL;
    if (!spawn_configured) {
        PyErr_SetString(PyExc_RuntimeError, "call _sandbox.configure() before spawn()");
        return NULL;
    }
    struct fz_outcome o;
    memset(&o, 0, sizeof(o));
    int rc = fz_spawn(&spawn_config, timeout_s, cpu_seconds, &o);
    if (rc < 0) {
        fz_outcome_free(&o);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (rc == 0) Py_RETURN_NONE;
    PyObject *r = Py_BuildValue("iiddy#y#y#", (int)o.killed, o.wait_status, o.cpu_seconds, o.duration_s,
                                o.result.data ? o.result.data : "", (Py_ssize_t)o.result.len,
                                o.out.data ? o.out.data : "", (Py_ssize_t)o.out.len,
                                o.err.data ? o.err.data : "", (Py_ssize_t)o.err.len);
    fz_outcome_free(&o);
    return r;
}

static PyObject *py_stamp(PyObject *self, PyObject *arg) {
    (void)self;
    if (fz_trace == NULL) Py_RETURN_NONE;
    long i = PyLong_AsLong(arg);
    if (i < 0 || i >= FZ_NSTAMPS) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "stamp index %ld is outside 0..%d", i, FZ_NSTAMPS - 1);
        return NULL;
    }
    fz_stamp((enum fz_stamp)i);
    Py_RETURN_NONE;
}

/* The last job's stamps as (ns tuple, faults tuple), or None when tracing is off; the page is
 * zeroed for the next child. */
static PyObject *py_trace_take(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (fz_trace == NULL) Py_RETURN_NONE;
    PyObject *ns = PyTuple_New(FZ_NSTAMPS), *faults = PyTuple_New(FZ_NSTAMPS);
    for (int i = 0; ns && faults && i < FZ_NSTAMPS; i++) {
        PyTuple_SET_ITEM(ns, i, PyLong_FromLongLong(fz_trace->ns[i]));
        PyTuple_SET_ITEM(faults, i, PyLong_FromLongLong(fz_trace->faults[i]));
    }
    memset(fz_trace, 0, sizeof(*fz_trace));
    if (ns == NULL || faults == NULL) {
        Py_XDECREF(ns);
        Py_XDECREF(faults);
        return NULL;
    }
    return Py_BuildValue("(NN)", ns, faults);
}

/* Code objects a job builds itself (code.replace, types.CodeType, a pickle that reaches them)
 * run bytecode the compiler never checked: an out-of-range LOAD_CONST reads any address.
 * Defence in depth beside the wiping of the zygote's freed memory (scrub.c), which is what keeps
 * earlier jobs' data out of reach: marshal.loads, which the import system needs for .pyc files,
 * and _imp.get_frozen_object(name, data) still build code from bytes. compile() of source
 * raises only "compile" and is not touched. A C hook: no Python object a job could find
 * (gc.get_objects) and rebind, and no hook removal exists. */
static int refuse_code_hook(const char *event, PyObject *args, void *data) {
    (void)args; (void)data;
    if (strcmp(event, "code.__new__") == 0) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s is refused in the sandbox: a job may not build code objects", event);
        return -1;
    }
    return 0;
}

static PyObject *py_refuse_code_objects(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (PySys_AddAuditHook(refuse_code_hook, NULL) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_wipe_freed_memory(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (fz_scrub_install() < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

void fz_unshare_huge_arenas(void);

/* The zygote's compiler process (zygote.Compiler): a raw fork, as spawn()'s, that stops wiping
 * in the child (the wiping table is not inherited), named for ps and the tests, and killed
 * with the zygote. It keeps the zygote's seccomp filter and memory: it runs compile(), never
 * a job's code, and forks nothing. It lives across batches, so before the zygote writes
 * anything but its C stack again it waits until the child has copied the huge pages it would
 * otherwise share (stash.c). Returns the pid, 0 in the compiler. */
static PyObject *py_fork_compiler(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int copied[2];
    if (pipe2(copied, O_CLOEXEC) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    pid_t zygote = getpid(), pid = fork();
    if (pid < 0) {
        int saved = errno;
        close(copied[0]);
        close(copied[1]);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (pid == 0) {
        fz_scrub_child();
        prctl(PR_SET_NAME, "fastazr-compile");
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != zygote) _exit(0); /* the zygote died before the line above */
        fz_unshare_huge_arenas();
        close(copied[0]);
        close(copied[1]); /* end of file: done */
        return PyLong_FromLong(0);
    }
    close(copied[1]);
    char byte;
    while (read(copied[0], &byte, 1) < 0 && errno == EINTR) {
    }
    close(copied[0]);
    return PyLong_FromLong(pid);
}

static PyObject *py_stamp_names(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
#define FZ_STAMP_NAME(name) #name,
    static const char *const stamp_names[] = {FZ_STAMPS(FZ_STAMP_NAME)};
#undef FZ_STAMP_NAME
    PyObject *t = PyTuple_New(FZ_NSTAMPS);
    for (int i = 0; t && i < FZ_NSTAMPS; i++) {
        PyObject *name = PyUnicode_FromString(stamp_names[i]);
        if (name == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, name);
    }
    return t;
}

static PyObject *py_reap(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    fz_reap_dying();
    Py_RETURN_NONE;
}

static PyObject *py_landlock_abi(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromLong(fz_landlock_abi());
}

static PyObject *py_landlock_ruleset(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Fast(arg, "landlock_ruleset takes a sequence of paths");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    const char **paths = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (paths == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        paths[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
        if (paths[i] == NULL) {
            PyMem_Free(paths);
            Py_DECREF(seq);
            return NULL;
        }
    }
    char err[256] = {0};
    int fd = fz_landlock_ruleset(paths, (size_t)n, err, sizeof(err));
    PyMem_Free(paths);
    Py_DECREF(seq);
    if (fd < 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    return PyLong_FromLong(fd);
}

static int put_name(PyObject *d, int nr, const char *name) {
    PyObject *k = PyLong_FromLong(nr), *v = PyUnicode_FromString(name);
    int rc = (k && v) ? PyDict_SetItem(d, k, v) : -1;
    Py_XDECREF(k);
    Py_XDECREF(v);
    return rc;
}

static PyObject *py_syscall_names(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    for (size_t i = 0; i < fz_nrules; i++)
        if (put_name(d, fz_rules[i].nr, fz_rules[i].name) < 0) goto fail;
    for (size_t i = 0; i < fz_ndenied_names; i++)
        if (put_name(d, fz_denied_names[i].nr, fz_denied_names[i].name) < 0) goto fail;
    return d;
fail:
    Py_DECREF(d);
    return NULL;
}

size_t fz_huge_arena_bytes(void);

static PyObject *py_huge_arena_bytes(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyLong_FromSize_t(fz_huge_arena_bytes());
}

static PyObject *py_have_libseccomp(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(fz_have_libseccomp());
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))py_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(devnull_fd, workdir, address_space, open_files, drop_to_uid, landlock_fd, "
     "output_cap, result_cap, result_pipe_capacity, trace=False): what every child gets; trace "
     "turns the per-stage stamps on."},
    {"spawn", py_spawn, METH_VARARGS,
     "spawn(timeout_s, cpu_seconds): fork a hardened child. Returns None in the child; in the zygote, once "
     "the child is gone, (killed, wait_status, cpu_seconds, duration_s, result, stdout, stderr) "
     "with killed 0, 1 (timeout) or 2 (output cap)."},
    {"stamp", py_stamp, METH_O, "stamp(i): take stamp i of the current job (a no-op unless tracing)."},
    {"trace_take", py_trace_take, METH_NOARGS,
     "The last job's stamps, (ns, minor faults) tuples indexed like stamp_names(); None unless tracing."},
    {"stamp_names", py_stamp_names, METH_NOARGS, "The names of the per-stage stamps, in index order."},
    {"refuse_code_objects", py_refuse_code_objects, METH_NOARGS,
     "Refuse code objects built by code.replace or types.CodeType in this process and the "
     "children it forks (an audit hook)."},
    {"wipe_freed_memory", py_wipe_freed_memory, METH_NOARGS,
     "From now on, wipe each block freed in this process (children of spawn() do not)."},
    {"fork_compiler", py_fork_compiler, METH_NOARGS,
     "fork_compiler(): fork the process that compiles jobs; its pid, 0 in it."},
    {"reap", py_reap, METH_NOARGS, "Wait for the children spawn() killed (it also does so itself)."},
    {"confine_zygote", py_confine_zygote, METH_O,
     "Set no_new_privs and install the zygote-stage filter ('bpf' or 'libseccomp'). Irreversible."},
    {"send_result", py_send_result, METH_VARARGS,
     "send_result(fd, status_index, value, error): write a child's result frame."},
    {"landlock_abi", py_landlock_abi, METH_NOARGS, "Kernel Landlock ABI version, 0 if absent."},
    {"landlock_ruleset", py_landlock_ruleset, METH_O,
     "Return a Landlock ruleset fd allowing reads beneath the given directories only."},
    {"syscall_names", py_syscall_names, METH_NOARGS, "{number: name} of syscalls the policy names."},
    {"huge_arena_bytes", py_huge_arena_bytes, METH_NOARGS,
     "Bytes of 2 MiB chunks holding this process's object arenas: 0 unless started with the module "
     "in LD_PRELOAD and FASTAZR_HUGE_ARENAS=1 (a zygote)."},
    {"have_libseccomp", py_have_libseccomp, METH_NOARGS, "Whether libseccomp was compiled in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastazr._sandbox",
    .m_doc = "C half of fastazr's sandbox.",
    .m_size = -1,
    .m_methods = methods,
};

extern PyTypeObject fz_stash_type;

PyMODINIT_FUNC PyInit__sandbox(void) {
    if (PyType_Ready(&fz_stash_type) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&fz_stash_type);
    if (PyModule_AddObject(m, "Stash", (PyObject *)&fz_stash_type) < 0) {
        Py_DECREF(&fz_stash_type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
