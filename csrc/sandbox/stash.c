/* fastazr._sandbox.Stash: byte strings kept in memory that fork() does not copy.
 *
 * The zygote keeps a batch's compiled jobs and its children's outputs here. With
 * MADV_DONTFORK the region is absent from every child, so no job can read another job's data
 * however it walks the heap, nothing needs zeroing per child, and the zygote's writes here
 * never take a copy-on-write fault (they cost ~10 faults a job as wiped Python bytes). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sys/mman.h>

typedef struct {
    PyObject_HEAD
    char *base;
    size_t used, capacity;
    size_t *ends; /* ends[i]: where item i stops; item i starts at ends[i - 1] (or 0) */
    Py_ssize_t count, slots;
} Stash;

static int reserve(Stash *s, size_t need) {
    if (s->used + need <= s->capacity) return 0;
    size_t capacity = s->capacity ? s->capacity : (size_t)1 << 20;
    while (capacity < s->used + need) capacity *= 2;
    void *p = s->base ? mremap(s->base, s->capacity, capacity, MREMAP_MAYMOVE)
                      : mmap(NULL, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* mremap keeps the flag; set it on every (re)mapping all the same */
    if (madvise(p, capacity, MADV_DONTFORK) != 0) {
        munmap(p, capacity);
        s->base = NULL;
        s->capacity = s->used = 0;
        s->count = 0;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->base = p;
    s->capacity = capacity;
    return 0;
}

static PyObject *stash_append(Stash *s, PyObject *arg) {
    char *data;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &data, &n) < 0) return NULL;
    if (s->count == s->slots) {
        Py_ssize_t slots = s->slots ? 2 * s->slots : 64;
        size_t *ends = PyMem_Realloc(s->ends, (size_t)slots * sizeof(size_t));
        if (ends == NULL) return PyErr_NoMemory();
        s->ends = ends;
        s->slots = slots;
    }
    if (reserve(s, (size_t)n) < 0) return NULL;
    memcpy(s->base + s->used, data, (size_t)n);
    s->used += (size_t)n;
    s->ends[s->count] = s->used;
    return PyLong_FromSsize_t(s->count++);
}

static PyObject *stash_get(Stash *s, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || i >= s->count) {
        PyErr_SetString(PyExc_IndexError, "stash index out of range");
        return NULL;
    }
    size_t start = i ? s->ends[i - 1] : 0;
    return PyBytes_FromStringAndSize(s->base + start, (Py_ssize_t)(s->ends[i] - start));
}

static Py_ssize_t stash_len(Stash *s) { return s->count; }

static void stash_dealloc(Stash *s) {
    if (s->base) munmap(s->base, s->capacity);
    PyMem_Free(s->ends);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef stash_methods[] = {
    {"append", (PyCFunction)stash_append, METH_O, "Store a bytes object; return its index."},
    {"get", (PyCFunction)stash_get, METH_O, "The bytes stored at an index (in the zygote only)."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods stash_sequence = {.sq_length = (lenfunc)stash_len};

PyTypeObject fz_stash_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastazr._sandbox.Stash",
    .tp_basicsize = sizeof(Stash),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Byte strings in memory that forked children do not inherit (MADV_DONTFORK).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)stash_dealloc,
    .tp_methods = stash_methods,
    .tp_as_sequence = &stash_sequence,
};
