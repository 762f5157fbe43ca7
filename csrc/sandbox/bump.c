/* A job's child allocates its new objects from a fresh region of its own, one after another,
 * instead of from the zygote's pymalloc pools.
 *
 * A pool is one 4 KiB page shared copy-on-write with the zygote: the first object a child
 * puts in it copies the page. A job's child wrote into ~48 pools of as many size classes
 * (2-core VM, the bench's mix: its first marshal.loads alone ~25), each a fault and a copy of
 * ~1.6 us; from a fresh region its objects lie side by side, a zero-filled page per 4 KiB of
 * them. Objects the child frees are not reused (it exits soon); past FZ_BUMP_BYTES, or for
 * blocks from before the fork, the inherited allocator serves, so a job that churns memory
 * loses at most FZ_BUMP_BYTES of its memory limit to this. The mem and object domains only
 * (both pymalloc, both called with the GIL held, so no lock); raw allocations stay malloc's. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "bump.h"

#define FZ_BUMP_BYTES ((size_t)4 << 20)
#define FZ_BUMP_ALIGN 16 /* pymalloc's alignment on 64-bit */

static char *lo, *next, *end;
static PyMemAllocatorEx inherited[2]; /* mem, object */

static int ours(const void *p) { return (const char *)p >= lo && (const char *)p < end; }

static void *take_bytes(size_t n) {
    size_t size = n == 0 ? FZ_BUMP_ALIGN : (n + FZ_BUMP_ALIGN - 1) & ~(size_t)(FZ_BUMP_ALIGN - 1);
    if (size < n || size > (size_t)(end - next)) return NULL; /* overflowed, or the region is spent */
    void *p = next;
    next += size;
    return p;
}

static void *bump_malloc(void *ctx, size_t n) {
    PyMemAllocatorEx *below = ctx;
    void *p = take_bytes(n);
    return p != NULL ? p : below->malloc(below->ctx, n);
}

static void *bump_calloc(void *ctx, size_t nelem, size_t elsize) {
    PyMemAllocatorEx *below = ctx;
    if (elsize != 0 && nelem > SIZE_MAX / elsize) return NULL;
    void *p = take_bytes(nelem * elsize); /* the region is fresh memory, never reused: zeros */
    return p != NULL ? p : below->calloc(below->ctx, nelem, elsize);
}

static void *bump_realloc(void *ctx, void *p, size_t n) {
    PyMemAllocatorEx *below = ctx;
    if (p == NULL) return bump_malloc(ctx, n);
    if (!ours(p)) return below->realloc(below->ctx, p, n);
    /* The old size is not kept: copy n bytes, or up to the end of what the region had handed
     * out before this call (the old block lies within it, and the new one past it: they never
     * overlap). Bytes past the old block are later objects', which realloc leaves undefined. */
    size_t handed_out = (size_t)(next - (char *)p);
    void *moved = bump_malloc(ctx, n);
    if (moved == NULL) return NULL;
    memcpy(moved, p, n < handed_out ? n : handed_out);
    return moved;
}

static void bump_free(void *ctx, void *p) {
    PyMemAllocatorEx *below = ctx;
    if (p != NULL && !ours(p)) below->free(below->ctx, p);
}

void fz_bump_install(void) {
    void *region = mmap(NULL, FZ_BUMP_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) return; /* the pools serve, as before */
    lo = next = region;
    end = lo + FZ_BUMP_BYTES;
    static const PyMemAllocatorDomain domains[2] = {PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
    for (int i = 0; i < 2; i++) {
        PyMem_GetAllocator(domains[i], &inherited[i]);
        PyMemAllocatorEx bump = {&inherited[i], bump_malloc, bump_calloc, bump_realloc, bump_free};
        PyMem_SetAllocator(domains[i], &bump);
    }
}
