/* fastazr._sandbox.Stash: byte strings kept in memory that fork() does not copy.
 *
 * The zygote keeps a batch's compiled jobs and its children's outputs here, and across batches
 * the code each job source compiled to (found by that source: put/find). With MADV_DONTFORK
 * every region of a Stash (the bytes, where each item ends, the key index) is absent from
 * every child, so no job can read another job's data however it walks the heap; the counts
 * and sizes kept in the object itself (which a child does inherit) answer only the process
 * that made the Stash, so a child learns neither the lengths of other jobs' outputs nor
 * whether a program ran before. Nothing needs zeroing per child, and the
 * zygote's writes here never take a copy-on-write fault (they cost ~10 faults a job as wiped
 * Python bytes).
 *
 * Also here, the zygote's other memory trick: its Python object arenas in huge pages (below). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A key's slot in the index: its hash, and the item holding the key (its value is the next). */
struct slot {
    uint64_t hash;
    Py_ssize_t item; /* -1: empty */
};

typedef struct {
    PyObject_HEAD
    char *base;
    size_t used, capacity;
    size_t *ends; /* ends[i]: where item i stops; item i starts at ends[i - 1] (or 0) */
    Py_ssize_t count, slots;
    struct slot *index; /* open addressing, at most half full; NULL until the first put */
    size_t index_size, keys;
    pid_t owner; /* the process that made it: a forked child gets an error, not even a length */
} Stash;

static int foreign(Stash *s) {
    if (getpid() == s->owner) return 0;
    PyErr_SetString(PyExc_PermissionError, "a Stash answers only the process that made it");
    return 1;
}

/* (Re)map a region of `size` bytes that children do not inherit; old (of old_size) is moved. */
static void *dontfork_region(void *old, size_t old_size, size_t size) {
    if (old) {
        /* MADV_DONTFORK is a flag of the mapping: mremap moves and grows it with the mapping
         * (tests/test_sandbox_memory.py checks a grown Stash), and on failure `old` is left as it was */
        void *p = mremap(old, old_size, size, MREMAP_MAYMOVE);
        return p == MAP_FAILED ? NULL : p;
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    if (madvise(p, size, MADV_DONTFORK) != 0) {
        munmap(p, size);
        return NULL;
    }
    return p;
}

static int reserve(Stash *s, size_t need) {
    if (s->used + need <= s->capacity) return 0;
    size_t capacity = s->capacity ? s->capacity : (size_t)1 << 20;
    while (capacity < s->used + need) capacity *= 2;
    char *p = dontfork_region(s->base, s->capacity, capacity);
    if (p == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    s->base = p;
    s->capacity = capacity;
    return 0;
}

static Py_ssize_t store(Stash *s, const char *data, Py_ssize_t n) {
    if (s->count == s->slots) {
        Py_ssize_t slots = s->slots ? 2 * s->slots : 512;
        size_t *ends = dontfork_region(s->ends, (size_t)s->slots * sizeof(size_t), (size_t)slots * sizeof(size_t));
        if (ends == NULL) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        s->ends = ends;
        s->slots = slots;
    }
    if (reserve(s, (size_t)n) < 0) return -1;
    memcpy(s->base + s->used, data, (size_t)n);
    s->used += (size_t)n;
    s->ends[s->count] = s->used;
    return s->count++;
}

static const char *item(Stash *s, Py_ssize_t i, size_t *n) {
    size_t start = i ? s->ends[i - 1] : 0;
    *n = s->ends[i] - start;
    return s->base + start;
}

static PyObject *stash_append(Stash *s, PyObject *arg) {
    if (foreign(s)) return NULL;
    char *data;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &data, &n) < 0) return NULL;
    Py_ssize_t i = store(s, data, n);
    return i < 0 ? NULL : PyLong_FromSsize_t(i);
}

static PyObject *stash_get(Stash *s, PyObject *arg) {
    if (foreign(s)) return NULL;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (i < 0 || i >= s->count) {
        PyErr_SetString(PyExc_IndexError, "stash index out of range");
        return NULL;
    }
    size_t n;
    const char *data = item(s, i, &n);
    return PyBytes_FromStringAndSize(data, (Py_ssize_t)n);
}

/* FNV-1a: keys are job sources the zygote already holds, so any fair spread will do. */
static uint64_t key_hash(const char *data, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)data[i]) * 1099511628211ULL;
    return h;
}

/* The slot of key (filled: it is there; empty: where it would go). */
static struct slot *lookup(Stash *s, const char *key, size_t n, uint64_t h) {
    size_t mask = s->index_size - 1;
    for (size_t at = h & mask;; at = (at + 1) & mask) {
        struct slot *slot = &s->index[at];
        if (slot->item < 0) return slot;
        size_t m;
        const char *stored = item(s, slot->item, &m);
        if (slot->hash == h && m == n && memcmp(stored, key, n) == 0) return slot;
    }
}

static int grow_index(Stash *s) {
    size_t size = s->index_size ? 2 * s->index_size : 1024;
    struct slot *old = s->index;
    size_t old_size = s->index_size;
    struct slot *fresh = dontfork_region(NULL, 0, size * sizeof(struct slot));
    if (fresh == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    for (size_t i = 0; i < size; i++) fresh[i].item = -1;
    s->index = fresh;
    s->index_size = size;
    for (size_t i = 0; i < old_size; i++) {
        if (old[i].item < 0) continue;
        size_t n;
        const char *key = item(s, old[i].item, &n);
        *lookup(s, key, n, old[i].hash) = old[i];
    }
    if (old) munmap(old, old_size * sizeof(struct slot));
    return 0;
}

static PyObject *stash_put(Stash *s, PyObject *args) {
    const char *key, *value;
    Py_ssize_t nk, nv;
    if (foreign(s)) return NULL;
    if (!PyArg_ParseTuple(args, "y#y#", &key, &nk, &value, &nv)) return NULL;
    if (2 * (s->keys + 1) > s->index_size && grow_index(s) < 0) return NULL;
    uint64_t h = key_hash(key, (size_t)nk);
    struct slot *slot = lookup(s, key, (size_t)nk, h);
    if (slot->item >= 0) Py_RETURN_NONE; /* already there: the first value stays */
    Py_ssize_t at = store(s, key, nk);
    if (at < 0 || store(s, value, nv) < 0) return NULL;
    slot->hash = h;
    slot->item = at;
    s->keys++;
    Py_RETURN_NONE;
}

static PyObject *stash_find(Stash *s, PyObject *arg) {
    if (foreign(s)) return NULL;
    char *key;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(arg, &key, &n) < 0) return NULL;
    if (s->index == NULL) Py_RETURN_NONE;
    struct slot *slot = lookup(s, key, (size_t)n, key_hash(key, (size_t)n));
    if (slot->item < 0) Py_RETURN_NONE;
    size_t m;
    const char *value = item(s, slot->item + 1, &m);
    return PyBytes_FromStringAndSize(value, (Py_ssize_t)m);
}

static Py_ssize_t stash_len(Stash *s) { return foreign(s) ? -1 : s->count; }

static PyObject *stash_nbytes(Stash *s, void *closure) {
    (void)closure;
    return foreign(s) ? NULL : PyLong_FromSize_t(s->used);
}

static PyObject *stash_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    Stash *s = (Stash *)PyType_GenericNew(type, args, kwargs);
    if (s != NULL) s->owner = getpid();
    return (PyObject *)s;
}

static void stash_dealloc(Stash *s) {
    if (s->base) munmap(s->base, s->capacity);
    if (s->ends) munmap(s->ends, (size_t)s->slots * sizeof(size_t));
    if (s->index) munmap(s->index, s->index_size * sizeof(struct slot));
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef stash_methods[] = {
    {"append", (PyCFunction)stash_append, METH_O, "Store a bytes object; return its index."},
    {"get", (PyCFunction)stash_get, METH_O, "The bytes stored at an index (in the zygote only)."},
    {"put", (PyCFunction)stash_put, METH_VARARGS,
     "put(key, value): store value under key (both bytes); a key already there keeps its value."},
    {"find", (PyCFunction)stash_find, METH_O, "The value put under key, or None."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef stash_getset[] = {
    {"nbytes", (getter)stash_nbytes, NULL, "Bytes stored, keys included.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods stash_sequence = {.sq_length = (lenfunc)stash_len};

PyTypeObject fz_stash_type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastazr._sandbox.Stash",
    .tp_basicsize = sizeof(Stash),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Byte strings in memory that forked children do not inherit (MADV_DONTFORK).",
    .tp_new = stash_new,
    .tp_dealloc = (destructor)stash_dealloc,
    .tp_methods = stash_methods,
    .tp_getset = stash_getset,
    .tp_as_sequence = &stash_sequence,
};

/* ---- the zygote's object arenas, in transparent huge pages ----
 *
 * fork copies, and a child's exit tears down, one page-table entry per private page of the
 * zygote, and after every fork each page the zygote writes faults again. CPython keeps its
 * small objects in arenas (1 MiB each in 3.10+) and bigger ones in glibc's heap: ~2.5 and
 * ~1.2 MiB of the zygote's ~5.3, written all over by every job it unmarshals and frees (~70
 * of its ~105 faults a job). In 2 MiB-aligned MADV_HUGEPAGE memory both sit in huge pages:
 * fork copies one entry per 2 MiB instead of 512, and the zygote's writes between children
 * fault once per huge page; a child that writes into one splits only its own mapping of it
 * (~7 us) and still copies just the 4 KiB pages it writes. On the 2-core VM: ~950 fewer
 * entries to copy and tear down, 36 zygote faults a job instead of 105, ~20% less CPU a job.
 *
 * It must be in place from the interpreter's first allocation, before any Python code runs:
 * the trainer starts a zygote with this module in LD_PRELOAD, FASTAZR_HUGE_ARENAS=1 and
 * GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc then grows its heap to 2 MiB boundaries and
 * madvises each growth), and the constructor below, run before Python's main, installs the
 * arena allocator and moves the program break up to a 2 MiB boundary, so the heap glibc
 * starts there is all huge pages too. Anywhere else (the trainer importing the module) it
 * does nothing. */

#ifndef MAP_FIXED_NOREPLACE /* headers before glibc 2.28 */
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#define FZ_HUGE_PAGE ((size_t)2 << 20)
#define FZ_MAX_RUNS 32  /* separate runs of chunks; past them arenas are mapped one by one */
#define FZ_MAX_SPARE 16 /* freed arenas kept for reuse; past them they are unmapped */

static struct {
    pid_t owner;                                 /* the zygote; 0 when not installed */
    char *lo[FZ_MAX_RUNS], *hi[FZ_MAX_RUNS];     /* runs of adjacent chunks */
    int runs;
    char *next, *end;                            /* the unused part of the last run */
    void *spare[FZ_MAX_SPARE];
    size_t spare_size[FZ_MAX_SPARE];
    int nspare;
    size_t bytes;                                /* mapped in chunks */
    char *heap;                                  /* where glibc's heap starts, 2 MiB aligned */
} huge;

static void *plain_arena(size_t size) {
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int in_chunks(const char *p) {
    for (int i = 0; i < huge.runs; i++)
        if (p >= huge.lo[i] && p < huge.hi[i]) return 1;
    return 0;
}

/* One more 2 MiB chunk: right after the last one when that space is free (one mapping, so
 * one more VMA for fork to copy only per run), else a fresh aligned run. MADV_HUGEPAGE can
 * fail (a kernel without THP) or be ignored (THP "never"): the chunk then holds 4 KiB pages,
 * as arenas do by default. */
static int grow_chunks(void) {
    if (huge.runs > 0) {
        char *p = mmap(huge.end, FZ_HUGE_PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == huge.end) {
            madvise(p, FZ_HUGE_PAGE, MADV_HUGEPAGE);
            huge.end += FZ_HUGE_PAGE;
            huge.hi[huge.runs - 1] = huge.end;
            huge.bytes += FZ_HUGE_PAGE;
            return 0;
        }
        if (p != MAP_FAILED) munmap(p, FZ_HUGE_PAGE); /* before Linux 4.17 the address was only a hint */
    }
    if (huge.runs == FZ_MAX_RUNS) return -1;
    char *raw = mmap(NULL, 2 * FZ_HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return -1;
    char *start = (char *)(((uintptr_t)raw + FZ_HUGE_PAGE - 1) & ~(uintptr_t)(FZ_HUGE_PAGE - 1));
    if (start > raw) munmap(raw, (size_t)(start - raw));
    munmap(start + FZ_HUGE_PAGE, (size_t)(raw + FZ_HUGE_PAGE - start));
    madvise(start, FZ_HUGE_PAGE, MADV_HUGEPAGE);
    huge.lo[huge.runs] = start;
    huge.hi[huge.runs] = start + FZ_HUGE_PAGE;
    huge.runs++;
    huge.next = start;
    huge.end = start + FZ_HUGE_PAGE;
    huge.bytes += FZ_HUGE_PAGE;
    return 0;
}

/* A child maps its new arenas one by one, as by default: a fresh huge page would cost it a
 * 2 MiB clear where a few 4 KiB pages do. */
static void *arena_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (getpid() != huge.owner || size > FZ_HUGE_PAGE) return plain_arena(size);
    for (int i = huge.nspare - 1; i >= 0; i--) {
        if (huge.spare_size[i] != size) continue;
        void *p = huge.spare[i];
        huge.nspare--;
        huge.spare[i] = huge.spare[huge.nspare];
        huge.spare_size[i] = huge.spare_size[huge.nspare];
        return p;
    }
    if ((size_t)(huge.end - huge.next) < size && grow_chunks() != 0) return plain_arena(size);
    void *p = huge.next;
    huge.next += size;
    return p;
}

/* A freed arena in a chunk is zeroed and kept, where the default unmapped it: unmapping part of
 * a huge page splits it. Its blocks were wiped one by one as they were freed (scrub.c), but
 * its pool headers and free-list links were not. A child's copy stays as it is: it exits soon. */
static void arena_free(void *ctx, void *p, size_t size) {
    (void)ctx;
    if (!in_chunks(p)) {
        munmap(p, size);
        return;
    }
    if (getpid() != huge.owner) return;
    memset(p, 0, size);
    if (huge.nspare == FZ_MAX_SPARE) {
        munmap(p, size);
        return;
    }
    huge.spare[huge.nspare] = p;
    huge.spare_size[huge.nspare] = size;
    huge.nspare++;
}

__attribute__((constructor)) static void install_huge_arenas(void) {
    /* Only when preloaded into a zygote, before its interpreter exists: imported later (the
     * trainer, with the variable set by hand) it would swap allocators mid-run and move the
     * break under threads that are allocating. Unset so no process started from here sees it. */
    const char *on = getenv("FASTAZR_HUGE_ARENAS");
    if (on == NULL || strcmp(on, "1") != 0 || Py_IsInitialized()) return;
    unsetenv("FASTAZR_HUGE_ARENAS");
    huge.owner = getpid();
    PyObjectArenaAllocator allocator = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&allocator);
    /* Past the break nothing is mapped yet (glibc has not grown its heap: the loader's own
     * allocations live elsewhere); if it had, it treats the gap as foreign memory and goes on. */
    char *brk_now = sbrk(0);
    char *aligned = (char *)(((uintptr_t)brk_now + FZ_HUGE_PAGE - 1) & ~(uintptr_t)(FZ_HUGE_PAGE - 1));
    if (brk_now != (char *)-1 && aligned != brk_now) sbrk(aligned - brk_now);
    huge.heap = brk_now == (char *)-1 ? NULL : aligned;
}

size_t fz_huge_arena_bytes(void) { return huge.bytes; }

#ifndef MADV_POPULATE_WRITE /* headers before Linux 5.14 */
#define MADV_POPULATE_WRITE 23
#endif

/* One fault a page, mapped pages only: a run of chunks has holes where arena_free unmapped an
 * arena (MADV_POPULATE_WRITE stops at the first, ENOMEM), and kernels before 5.14 lack it
 * (EINVAL). MADV_WILLNEED fails (ENOMEM) exactly where nothing is mapped. */
static void own_copy(char *lo, char *hi) {
    if (lo >= hi || madvise(lo, (size_t)(hi - lo), MADV_POPULATE_WRITE) == 0) return;
    for (char *p = lo; p < hi; p += 4096)
        if (madvise(p, 4096, MADV_WILLNEED) == 0) *(volatile char *)p = *(volatile char *)p;
}

/* In a long-lived child of the zygote (its compiler): take private copies of every page of the
 * chunks and the heap, so that the child maps none of the zygote's huge pages. Shared with a
 * live child, the zygote's next write into a huge page would split its own mapping into 4 KiB
 * entries for good (khugepaged does not merge pages another process maps): every huge page
 * was split after the first batch, and fork and exit went back to copying and tearing down
 * ~1,500 more entries a job. Costs the child ~1,500 copy-on-write copies once per compiler
 * (fork_compiler took 2.9-5.5 ms in all on the 2-core VM). The zygote must not write into the
 * chunks or the heap until this has returned (fork_compiler waits for it). */
void fz_unshare_huge_arenas(void) {
    for (int i = 0; i < huge.runs; i++) own_copy(huge.lo[i], huge.hi[i]);
    if (huge.heap != NULL) own_copy(huge.heap, sbrk(0));
}
