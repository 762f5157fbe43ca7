/* fastazr._sandbox: the C half of the sandbox, called by the zygote (fastazr/sandbox/zygote.py).
 *
 *   harden(...)             turn a just-forked child into a sandboxed one
 *   landlock_abi()          the kernel's Landlock ABI version, 0 when absent
 *   landlock_ruleset(paths) a ruleset fd allowing reads beneath paths only (built once per zygote)
 *   syscall_names()         {number: name} for every syscall the policy names
 *   have_libseccomp()       whether this build can use libseccomp
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "harden.h"
#include "policy.h"

static PyObject *py_harden(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *names[] = {"job_fd", "result_fd", "stdout_fd", "stderr_fd", "devnull_fd",
                            "workdir", "address_space", "cpu_seconds", "open_files",
                            "drop_to_uid", "landlock_fd", "backend", NULL};
    struct fz_harden_opts o;
    const char *backend;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiisKKKlis", names, &o.job_fd, &o.result_fd,
                                     &o.stdout_fd, &o.stderr_fd, &o.devnull_fd, &o.workdir,
                                     &o.address_space, &o.cpu_seconds, &o.open_files,
                                     &o.drop_to_uid, &o.landlock_fd, &backend))
        return NULL;
    if (strcmp(backend, "bpf") == 0) {
        o.backend = FZ_BACKEND_BPF;
    } else if (strcmp(backend, "libseccomp") == 0) {
        o.backend = FZ_BACKEND_LIBSECCOMP;
    } else {
        PyErr_Format(PyExc_ValueError, "backend must be 'bpf' or 'libseccomp', got '%s'", backend);
        return NULL;
    }
    char err[256] = {0};
    if (fz_harden(&o, err, sizeof(err)) != 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
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

static PyObject *py_allowed_syscalls(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    PyObject *d = PyDict_New();
    if (d == NULL) return NULL;
    static const char *kinds[] = {"always", "no write flags", "own pid only", "not SIGSYS",
                                  "listed commands only", "read only"};
    for (size_t i = 0; i < fz_nrules; i++) {
        PyObject *v = PyUnicode_FromString(kinds[fz_rules[i].kind]);
        if (v == NULL || PyDict_SetItemString(d, fz_rules[i].name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *py_have_libseccomp(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(fz_have_libseccomp());
}

static PyMethodDef methods[] = {
    {"harden", (PyCFunction)(void (*)(void))py_harden, METH_VARARGS | METH_KEYWORDS,
     "Sandbox the calling (just forked, single-threaded) process. Irreversible."},
    {"landlock_abi", py_landlock_abi, METH_NOARGS, "Kernel Landlock ABI version, 0 if absent."},
    {"landlock_ruleset", py_landlock_ruleset, METH_O,
     "Return a Landlock ruleset fd allowing reads beneath the given directories only."},
    {"syscall_names", py_syscall_names, METH_NOARGS, "{number: name} of syscalls the policy names."},
    {"allowed_syscalls", py_allowed_syscalls, METH_NOARGS, "{name: condition} of allowed syscalls."},
    {"have_libseccomp", py_have_libseccomp, METH_NOARGS, "Whether libseccomp was compiled in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fastazr._sandbox",
                                    "C half of fastazr's sandbox.", -1, methods};

PyMODINIT_FUNC PyInit__sandbox(void) { return PyModule_Create(&module); }
