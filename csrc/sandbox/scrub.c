/* The zygote's freed memory, wiped: no later child inherits an earlier job's bytes.
 *
 * The zygote's Python handles job data (it compiles each batch's sources, unmarshals each
 * job's code before its fork, decodes outputs to judge them), and CPython's allocators keep
 * freed blocks as they were: every later child inherited them, and a job able to read raw memory
 * (ctypes where Landlock is off; bytecode from marshal.loads) found earlier jobs' programs,
 * printed text and return values (tests/test_sandbox_isolation.py).
 *
 * A hook on all three allocator domains (raw, mem, object), installed in the zygote once its
 * startup imports are done, records each block it hands out (address -> size) in a table, and
 * wipes a recorded block when it is freed. realloc of a recorded block is a fresh block, a copy
 * and a wiped free, since the allocators below would free the old block where the hook cannot
 * see it. Blocks from before the hook pass through unwiped: they hold startup state only.
 *
 * The table, not a header in front of each block: blocks keep their sizes and places (a header
 * would grow every object by 16 bytes, and so the pages each fork copies), and nothing a child
 * can write into the zygote's memory (its outputs) could pass for a record, as a forged header
 * could. The table is MADV_DONTFORK memory: children do not inherit it, so fork copies none of
 * it. Children inherit the hook but neither record nor wipe (fz_scrub_child): their garbage dies
 * with them, and a memset per free would tax every job.
 *
 * Out of the hook's reach: hashes left in dict entries after their keys die (the interned-string
 * table keeps the hashes of a job's identifiers), and what CPython's free lists hold until the
 * zygote empties them (gc.collect(), once a batch). Cost in the zygote: a table probe per
 * allocation and per free, a memset per free. The zygote is single-threaded (zygote.main checks),
 * so the table takes no lock. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

struct record {
    uintptr_t block; /* 0: empty */
    size_t size;
};

static PyMemAllocatorEx below[3]; /* raw, mem, object: what each domain had before the hook */
static struct {
    struct record *slots;
    size_t capacity, count; /* capacity a power of two, at most half full */
} table;
static int installed, wiping;

static size_t slot_of(uintptr_t block) {
    return (size_t)(((uint64_t)block * 0x9E3779B97F4A7C15ULL) >> 16) & (table.capacity - 1);
}

static struct record *fresh_slots(size_t capacity) {
    void *p = mmap(NULL, capacity * sizeof(struct record), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    if (madvise(p, capacity * sizeof(struct record), MADV_DONTFORK) != 0) {
        munmap(p, capacity * sizeof(struct record));
        return NULL;
    }
    return p; /* zero-filled: every slot empty */
}

static void place(uintptr_t block, size_t size) {
    size_t i = slot_of(block);
    while (table.slots[i].block != 0 && table.slots[i].block != block) i = (i + 1) & (table.capacity - 1);
    if (table.slots[i].block == 0) table.count++;
    table.slots[i].block = block;
    table.slots[i].size = size;
}

/* Record a block; 0 when the table cannot grow (the block is then handed back, see record). */
static int remember(void *block, size_t size) {
    if (2 * (table.count + 1) > table.capacity) {
        struct record *old = table.slots;
        size_t old_capacity = table.capacity;
        struct record *slots = fresh_slots(2 * old_capacity);
        if (slots == NULL) return 0;
        table.slots = slots;
        table.capacity = 2 * old_capacity;
        table.count = 0;
        for (size_t i = 0; i < old_capacity; i++)
            if (old[i].block != 0) place(old[i].block, old[i].size);
        munmap(old, old_capacity * sizeof(struct record));
    }
    place((uintptr_t)block, size);
    return 1;
}

/* Remove block's record; its size, or -1 when it has none. Linear probing with backward-shift
 * deletion: no tombstones, so probes stay short however many blocks come and go. */
static Py_ssize_t forget(void *block) {
    size_t mask = table.capacity - 1, i = slot_of((uintptr_t)block);
    while (table.slots[i].block != (uintptr_t)block) {
        if (table.slots[i].block == 0) return -1;
        i = (i + 1) & mask;
    }
    size_t size = table.slots[i].size;
    for (size_t j = (i + 1) & mask; table.slots[j].block != 0; j = (j + 1) & mask) {
        size_t home = slot_of(table.slots[j].block);
        /* the entry at j may move back to the hole at i if its home is not in (i, j] */
        if (((j - home) & mask) >= ((j - i) & mask)) {
            table.slots[i] = table.slots[j];
            i = j;
        }
    }
    table.slots[i].block = 0;
    table.count--;
    return (Py_ssize_t)size;
}

/* A block from below, recorded; a block that cannot be recorded is freed and NULL returned (a
 * MemoryError in Python) rather than handed out unrecorded, where its bytes would outlive it. */
static void *record(PyMemAllocatorEx *b, void *block, size_t size) {
    if (block == NULL || !wiping || remember(block, size)) return block;
    b->free(b->ctx, block);
    return NULL;
}

static void *hook_malloc(void *ctx, size_t size) {
    PyMemAllocatorEx *b = ctx;
    return record(b, b->malloc(b->ctx, size), size);
}

static void *hook_calloc(void *ctx, size_t nelem, size_t elsize) {
    PyMemAllocatorEx *b = ctx;
    return record(b, b->calloc(b->ctx, nelem, elsize), nelem * elsize);
}

static void hook_free(void *ctx, void *p) {
    PyMemAllocatorEx *b = ctx;
    if (p != NULL && wiping) {
        Py_ssize_t size = forget(p);
        if (size > 0) explicit_bzero(p, (size_t)size);
    }
    b->free(b->ctx, p);
}

static void *hook_realloc(void *ctx, void *p, size_t size) {
    PyMemAllocatorEx *b = ctx;
    if (p == NULL || !wiping) return p == NULL ? hook_malloc(ctx, size) : b->realloc(b->ctx, p, size);
    Py_ssize_t old = forget(p);
    if (old < 0) { /* from before the hook: moved or not, p is gone once realloc succeeds */
        void *moved = b->realloc(b->ctx, p, size);
        if (moved != NULL) remember(moved, size); /* unrecorded when the table cannot grow */
        return moved;
    }
    void *fresh = hook_malloc(ctx, size);
    if (fresh == NULL) {
        remember(p, (size_t)old); /* p stays as it was; its record's slot was just freed */
        return NULL;
    }
    memcpy(fresh, p, size < (size_t)old ? size : (size_t)old);
    explicit_bzero(p, (size_t)old);
    b->free(b->ctx, p);
    return fresh;
}

int fz_scrub_install(void) {
    if (installed) return 0;
    table.capacity = 1 << 16;
    table.slots = fresh_slots(table.capacity);
    if (table.slots == NULL) return -1;
    static const PyMemAllocatorDomain domains[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
    for (int i = 0; i < 3; i++) {
        PyMem_GetAllocator(domains[i], &below[i]);
        PyMemAllocatorEx hook = {&below[i], hook_malloc, hook_calloc, hook_realloc, hook_free};
        PyMem_SetAllocator(domains[i], &hook);
    }
    installed = wiping = 1;
    return 0;
}

void fz_scrub_child(void) { wiping = 0; }
