/*
 * fastpath: mem's READ, WRITE, KVM_SET_MEMORY_ATTRIBUTES2 and FALLOCATE served in C (fastpath.h says what
 * and why).
 *
 * Each request is served here only when every condition of the common case holds; otherwise the function
 * returns 0 having changed nothing, and lowlevel.py's Python handler answers it exactly as before (the
 * error replies, the memory charge, allocation, the revocation's slow cases). The conditions, per kind:
 *
 *  READ  (a page fill): the handle is a mem handle of this inode; no lock owner (read(2) is Python's
 *        EINVAL); the file has memory and a core; under the state lock the core allows the host read
 *        (-EFAULT is the rule's answer: EIO; a pending punch goes to Python, which reads around it) and
 *        every page is allocated, so its folio is already committed and marking it cached changes no
 *        charge. The reply is sent straight from the mapping, holding the file (not the lock).
 *  WRITE (a write-back): writepage; the same handle and memory; the core allows the host write and every
 *        page is allocated (else Python allocates and recounts the charge); the copy is made under the
 *        state lock, so a punch cannot free the pages under it.
 *  IOCTL KVM_SET_MEMORY_ATTRIBUTES2, not compat, a writable handle, 128 bytes in and out, in-place
 *        conversion on, the private view never used (its close runs in Python), an inline slot free (the
 *        deadlock rule) and the invalidate lock free now (else Python, which defers). To private, the
 *        cached pages of the range must all be allocated (revoking an unallocated one gives a charge back)
 *        and a write-back descriptor must be registered if any is cached (Python opens one). Then the steps
 *        of transitions.py: mark the parts uncached, write back and invalidate them without the state
 *        lock, commit (or, on failure, re-mark, abort and reply the errno) and count the revocation.
 *  FALLOCATE (conversions.py's fallocate): a writable handle; the backend registered its own mapping
 *        (Backend.fallocate_mapping: it allocates and punches exactly as done here), folios of one page
 *        and the charge counters set, the private view never used (a punch revokes it: Python's), an
 *        inline slot free (an allocation may wait in reclaim) and the invalidate lock free now. The core's
 *        refusals are replied from here. An allocation charges the pages it commits (ENOMEM past a
 *        bound, nothing changed), populates them through the backend's mapping (a failure is refunded
 *        and passed: Python allocates again and says why) and marks them allocated, counting an
 *        allocation. A punch needs the write-back descriptor if any page of it is cached; then the
 *        conversion's steps, with the backend's punch and the commit inside the charge recount of
 *        transitions.py's _recounting, and a revocation counted as Python counts it (the whole range).
 *        Should the private view serve a page while the revocation runs, the marks are undone, the
 *        punch aborted and Python punches (it revokes the private view as well).
 */
#define _GNU_SOURCE
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "counter.h"
#include "fastpath.h"
#include "idmap.h"
#include "gmem.h"
#include "runmap.h"

#define UFS_PAGE_SHIFT 12
#define UFS_PAGE_SIZE (1ull << UFS_PAGE_SHIFT)
#define UFS_KVM_SET_MEMORY_ATTRIBUTES2 0xC080AED2u
#define UFS_ATTRIBUTES2_SIZE 128
#define UFS_ERROR_OFFSET_AT 32        /* offsetof(struct kvm_memory_attributes2, error_offset) */
#define UFS_PRIVATE 8ull              /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
#define UFS_ZEROS (4u << 20)          /* the largest fill of a hole C answers (FUSE's max_pages * 4 KiB) */

/* ---- the session ---- */
struct ufs_fast {
    void *py;
    struct fuse_session *se;
    atomic_int enabled;
    atomic_int inline_used;
    atomic_int hold_wanted, held;     /* --low-latency (latency.py) */
    atomic_int_fast64_t last_ns;
    const char *zeros;           /* a read-only mapping of zeros, UFS_ZEROS bytes, for fills of holes */
    pthread_rwlock_t lock;       /* files and handles; a leaf */
    struct ufs_map files;        /* mem inode -> struct ufs_file * (one reference) */
    struct ufs_map handles;      /* fh -> inode << 1 | writable */
    atomic_uint_fast64_t compiled[UFS_KINDS], python[UFS_KINDS];
};

struct ufs_file {
    atomic_long refs;
    atomic_long busy;            /* requests holding it now (each also holds a reference) */
    uint64_t ino;
    pthread_mutex_t state, inval;
    int closed;                  /* removed from its session: served by Python only (state) */
    int private_active;          /* the private view has served a page: conversions go to Python (state) */
    int in_place_conversion;
    int wb_fd;                   /* our descriptor of mem for bulk write-back (ours to close), or -1 (state) */
    int wb_inuse;                /* the one a conversion is writing back through now, or -1 (state) */
    char *base;                  /* the backend's memory, mapped here, or NULL */
    int memfd;                   /* the backend's descriptor of it, borrowed: Python closes the backend only
                                    after ufs_fast_remove_file (state), or -1 */
    int huge;                    /* the backend's mapping asks for THP: allocate through our mapping */
    char *falloc_map;            /* the backend's own mapping, borrowed as memfd is: fallocate(2) is served
                                    here (ufs_file_set_fallocate), or NULL */
    uint64_t size;
    struct runmap *cached;       /* Entry.cached: pages a fill handed out since their last revocation */
    int64_t charged;             /* Entry.charged: bytes of the budget this file holds (state) */
    struct ufs_counter *user_mem, *mount_mem;   /* where its charges go (budget.py), or NULL */
    void *gm;                    /* struct gmem *, our own reference, or NULL */
};

struct ufs_fast *ufs_fast_new(void *py)
{
    struct ufs_fast *fast = calloc(1, sizeof(*fast));
    if (fast == NULL)
        return NULL;
    fast->py = py;
    void *zeros = mmap(NULL, UFS_ZEROS, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    fast->zeros = zeros == MAP_FAILED ? NULL : zeros;   /* none: holes are filled by Python */
    atomic_init(&fast->enabled, 0);
    atomic_init(&fast->inline_used, 0);
    pthread_rwlock_init(&fast->lock, NULL);
    return fast;
}

void *ufs_fast_py(struct ufs_fast *fast) { return fast->py; }
void ufs_fast_set_session(struct ufs_fast *fast, struct fuse_session *se) { fast->se = se; }
void ufs_fast_set_enabled(struct ufs_fast *fast, int enabled) { atomic_store(&fast->enabled, enabled != 0); }
int ufs_fast_enabled(struct ufs_fast *fast) { return atomic_load(&fast->enabled); }

void ufs_fast_free(struct ufs_fast *fast)
{
    if (fast == NULL)
        return;
    uint64_t ino, val;
    for (size_t i = 0; i < fast->files.cap; i++)
        if (ufs_map_live(&fast->files, i, &ino, &val))
            ufs_file_put((struct ufs_file *)(uintptr_t)val);
    ufs_map_free(&fast->files);
    ufs_map_free(&fast->handles);
    pthread_rwlock_destroy(&fast->lock);
    if (fast->zeros != NULL)
        munmap((void *)fast->zeros, UFS_ZEROS);
    free(fast);
}

void ufs_fast_set_hold(struct ufs_fast *fast, int wanted) { atomic_store(&fast->hold_wanted, wanted != 0); }
void ufs_fast_set_held(struct ufs_fast *fast, int held) { atomic_store(&fast->held, held != 0); }
int64_t ufs_fast_last_ns(struct ufs_fast *fast) { return atomic_load(&fast->last_ns); }

/* Whether C may serve a request now: switched on, and under --low-latency only while the hold is held
   (the request's time is noted for its expiry); otherwise Python's hook must see it. */
static int may_serve(struct ufs_fast *fast)
{
    if (!atomic_load_explicit(&fast->enabled, memory_order_relaxed))
        return 0;
    if (!atomic_load_explicit(&fast->hold_wanted, memory_order_relaxed))
        return 1;
    if (!atomic_load(&fast->held))
        return 0;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    atomic_store(&fast->last_ns, (int64_t)now.tv_sec * 1000000000 + now.tv_nsec);
    return 1;
}

int ufs_fast_inline_take(struct ufs_fast *fast)
{
    int used = atomic_load(&fast->inline_used);
    while (used < UFS_INLINE_SLOTS)
        if (atomic_compare_exchange_weak(&fast->inline_used, &used, used + 1))
            return 1;
    return 0;
}

void ufs_fast_inline_give(struct ufs_fast *fast) { atomic_fetch_sub(&fast->inline_used, 1); }

void ufs_fast_counts(struct ufs_fast *fast, uint64_t *compiled, uint64_t *python)
{
    for (int k = 0; k < UFS_KINDS; k++) {
        compiled[k] = atomic_load(&fast->compiled[k]);
        python[k] = atomic_load(&fast->python[k]);
    }
}

void ufs_fast_count_python(struct ufs_fast *fast, int kind) { atomic_fetch_add(&fast->python[kind], 1); }
static void count_compiled(struct ufs_fast *fast, int kind) { atomic_fetch_add(&fast->compiled[kind], 1); }

/* ---- files ---- */
struct ufs_file *ufs_file_new(uint64_t ino, uintptr_t gmem, uint64_t size, int memfd, int in_place_conversion,
                              int *err)
{
    struct ufs_file *f = calloc(1, sizeof(*f));
    *err = 0;
    if (f == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    atomic_init(&f->refs, 1);
    atomic_init(&f->busy, 0);
    f->ino = ino;
    f->size = size;
    f->in_place_conversion = in_place_conversion;
    f->wb_fd = f->wb_inuse = f->memfd = -1;
    pthread_mutex_init(&f->state, NULL);
    pthread_mutex_init(&f->inval, NULL);
    uint64_t npages = (size + UFS_PAGE_SIZE - 1) >> UFS_PAGE_SHIFT;
    f->cached = runmap_new(npages, 0);
    if (f->cached == NULL) {
        *err = -ENOMEM;
        ufs_file_put(f);
        return NULL;
    }
    if (gmem) {
        f->gm = (struct gmem *)gmem;
        gmem_get(f->gm);
    }
    if (memfd >= 0 && size > 0) {
        /* Our own mapping of our own descriptor: it lives as long as this file's last reference, whatever
           the backend object does meanwhile (a reply in flight reads from it). */
        void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
        if (base != MAP_FAILED) {   /* else (a file of tens of TiB: no address space left) Python serves */
            f->base = base;
            f->memfd = memfd;
        }
    }
    return f;
}

/* The memory, the write-back descriptor and the core's reference go (state held, or the last reference). */
static void release_resources(struct ufs_file *f)
{
    if (f->base != NULL)
        munmap(f->base, f->size);
    f->base = NULL;
    f->memfd = -1;
    f->falloc_map = NULL;
    if (f->wb_fd >= 0)
        close(f->wb_fd);
    f->wb_fd = -1;
    if (f->gm != NULL)
        gmem_put(f->gm);
    f->gm = NULL;
}

void ufs_file_put(struct ufs_file *f)
{
    if (f == NULL || atomic_fetch_sub(&f->refs, 1) != 1)
        return;
    release_resources(f);
    ufs_counter_put(f->user_mem);
    ufs_counter_put(f->mount_mem);
    runmap_free(f->cached);
    pthread_mutex_destroy(&f->state);
    pthread_mutex_destroy(&f->inval);
    free(f);
}

static pthread_mutex_t *lock_of(struct ufs_file *f, int which) { return which == UFS_LOCK_INVAL ? &f->inval : &f->state; }
void ufs_file_lock(struct ufs_file *f, int which) { pthread_mutex_lock(lock_of(f, which)); }
int ufs_file_trylock(struct ufs_file *f, int which) { return pthread_mutex_trylock(lock_of(f, which)) == 0; }
void ufs_file_unlock(struct ufs_file *f, int which) { pthread_mutex_unlock(lock_of(f, which)); }
struct runmap *ufs_file_cached(struct ufs_file *f) { return f->cached; }
int ufs_file_memory_mapped(struct ufs_file *f) { return f->base != NULL; }

void ufs_file_advise_huge(struct ufs_file *f)
{
    /* pages our write-backs allocate get huge folios as the backend's own faults do */
    if (f->base != NULL)
        madvise(f->base, f->size, MADV_HUGEPAGE);
    f->huge = 1;
}

void ufs_file_set_fallocate(struct ufs_file *f, uintptr_t mapping)
{
    pthread_mutex_lock(&f->state);
    if (f->base != NULL && f->memfd >= 0)   /* only with the memory C serves the rest from */
        f->falloc_map = (char *)mapping;
    pthread_mutex_unlock(&f->state);
}

void ufs_file_set_counters(struct ufs_file *f, struct ufs_counter *user, struct ufs_counter *mount)
{
    ufs_counter_get(user);
    ufs_counter_get(mount);
    pthread_mutex_lock(&f->state);
    struct ufs_counter *old_user = f->user_mem, *old_mount = f->mount_mem;
    f->user_mem = user;
    f->mount_mem = mount;
    pthread_mutex_unlock(&f->state);
    ufs_counter_put(old_user);
    ufs_counter_put(old_mount);
}

int64_t ufs_file_charged(struct ufs_file *f) { return f->charged; }
void ufs_file_set_charged(struct ufs_file *f, int64_t charged) { f->charged = charged; }

/* Charge n more bytes for the file: its owner's bound first, then the mount's cap (budget.py's order);
   -ENOMEM with nothing counted if either refuses (unless force). State held. */
static int charge(struct ufs_file *f, int64_t n, int force)
{
    if (n <= 0)
        return 0;
    if (ufs_counter_take(f->user_mem, n, force) < 0)
        return -ENOMEM;
    if (ufs_counter_take(f->mount_mem, n, force) < 0) {
        ufs_counter_give(f->user_mem, n);
        return -ENOMEM;
    }
    f->charged += n;
    return 0;
}

/* Give n bytes of the file's charge back (never more than it holds). State held. */
static void refund(struct ufs_file *f, int64_t n)
{
    if (n <= 0 || n > f->charged)
        return;
    f->charged -= n;
    ufs_counter_give(f->mount_mem, n);
    ufs_counter_give(f->user_mem, n);
}

void ufs_file_set_private_active(struct ufs_file *f) { f->private_active = 1; }   /* state held */

int ufs_file_set_write_back(struct ufs_file *f, int fd)
{
    pthread_mutex_lock(&f->state);
    int old = f->wb_fd;
    f->wb_fd = fd;
    if (old == f->wb_inuse)
        old = -1;              /* the conversion writing back through it closes it when done */
    pthread_mutex_unlock(&f->state);
    if (old >= 0)
        close(old);
    return 0;
}

int ufs_fast_add_file(struct ufs_fast *fast, struct ufs_file *f)
{
    atomic_fetch_add(&f->refs, 1);
    pthread_rwlock_wrlock(&fast->lock);
    uint64_t old;
    struct ufs_file *replaced = ufs_map_find(&fast->files, f->ino, &old) ? (struct ufs_file *)(uintptr_t)old : NULL;
    int err = ufs_map_put(&fast->files, f->ino, (uint64_t)(uintptr_t)f);
    pthread_rwlock_unlock(&fast->lock);
    if (err) {
        ufs_file_put(f);
        return err;
    }
    ufs_file_put(replaced);
    return 0;
}

void ufs_fast_remove_file(struct ufs_fast *fast, uint64_t ino)
{
    uint64_t val;
    pthread_rwlock_wrlock(&fast->lock);
    int found = ufs_map_del(&fast->files, ino, &val);
    pthread_rwlock_unlock(&fast->lock);
    if (!found)
        return;
    struct ufs_file *f = (struct ufs_file *)(uintptr_t)val;
    /* A request that found it before sees closed under the state lock and passes; one past that point
       (a reply being sent from the mapping) is waited for: microseconds, and it never waits for us. Then
       the memory goes now, not whenever Python drops its last reference (cached stays: Python's map). */
    pthread_mutex_lock(&f->state);
    f->closed = 1;
    pthread_mutex_unlock(&f->state);
    while (atomic_load(&f->busy) > 0)
        sched_yield();
    pthread_mutex_lock(&f->state);
    release_resources(f);
    pthread_mutex_unlock(&f->state);
    ufs_file_put(f);
}

static void request_done(struct ufs_file *f)
{
    atomic_fetch_sub(&f->busy, 1);
    ufs_file_put(f);
}

int ufs_fast_open(struct ufs_fast *fast, uint64_t fh, uint64_t ino, int writable)
{
    pthread_rwlock_wrlock(&fast->lock);
    int err = ufs_map_put(&fast->handles, fh, ino << 1 | (writable != 0));
    pthread_rwlock_unlock(&fast->lock);
    return err;
}

void ufs_fast_release(struct ufs_fast *fast, uint64_t fh)
{
    uint64_t val;
    pthread_rwlock_wrlock(&fast->lock);
    ufs_map_del(&fast->handles, fh, &val);
    pthread_rwlock_unlock(&fast->lock);
}

/* Whether ino is a registered mem file (for the counters of requests passed to Python). */
static int is_mem(struct ufs_fast *fast, uint64_t ino)
{
    uint64_t val;
    pthread_rwlock_rdlock(&fast->lock);
    int found = ufs_map_find(&fast->files, ino, &val);
    pthread_rwlock_unlock(&fast->lock);
    return found;
}

static int passed(struct ufs_fast *fast, uint64_t ino, int kind)
{
    if (is_mem(fast, ino))
        atomic_fetch_add(&fast->python[kind], 1);
    return 0;
}

/* The file of a request on handle fh of inode ino, with a reference, if fh is a mem handle of that inode
   (and writable, if asked); NULL: not ours to serve (Python answers EBADF, ENOENT, ...). */
static struct ufs_file *file_of(struct ufs_fast *fast, uint64_t ino, uint64_t fh, int need_writable)
{
    uint64_t handle, val;
    struct ufs_file *f = NULL;
    pthread_rwlock_rdlock(&fast->lock);
    if (ufs_map_find(&fast->handles, fh, &handle) && handle >> 1 == ino && (!need_writable || handle & 1)
            && ufs_map_find(&fast->files, ino, &val)) {
        f = (struct ufs_file *)(uintptr_t)val;
        atomic_fetch_add(&f->refs, 1);
        atomic_fetch_add(&f->busy, 1);   /* under the lock: remove_file, after it, sees us */
    }
    pthread_rwlock_unlock(&fast->lock);
    return f;
}


enum action { PASS = 0, REPLY_DATA, REPLY_ZEROS, REPLY_EIO };

#define RUNS_AT_ONCE 64

static uint64_t first_page(uint64_t off) { return off >> UFS_PAGE_SHIFT; }
static uint64_t end_page(uint64_t end) { return (end + UFS_PAGE_SIZE - 1) >> UFS_PAGE_SHIFT; }

/* Whether C may change this file's charge: its counters are set and a folio is one page (the charge is
   then per page: a hugetlb file's folios are all allocated at creation anyway). */
static int charges_here(struct ufs_file *f, struct gmem *gm)
{
    return f->user_mem != NULL && f->mount_mem != NULL && gm->folio_size == UFS_PAGE_SIZE;
}

/* Pages of [first, last) neither allocated nor possibly cached: the ones not committed (budget.py), for
   a file whose folio is one page. A change's charge is the change of this count. State held. */
static uint64_t uncommitted(struct ufs_file *f, struct gmem *gm, uint64_t first, uint64_t last)
{
    uint64_t starts[RUNS_AT_ONCE], cursor = first, n = 0;
    int64_t values[RUNS_AT_ONCE];
    while (cursor < last) {
        uint64_t got = runmap_runs(gm->allocated, &cursor, last, starts, values, RUNS_AT_ONCE);
        for (uint64_t i = 0; i < got; i++) {
            uint64_t end = i + 1 < got ? starts[i + 1] : cursor;
            if (values[i] == 0)
                n += runmap_count(f->cached, 0, starts[i], end);
        }
        if (got == 0)
            break;
    }
    return n;
}

/* A fill, state held: what to answer, and with how many bytes (*n, clamped to EOF as mem.py does). */
static enum action fill_locked(struct ufs_fast *fast, struct ufs_file *f, struct gmem *gm, int64_t off, uint64_t *n)
{
    if ((uint64_t)off < gm->size && *n > gm->size - off)
        *n = gm->size - off;
    struct gmem_err e;
    int r = gmem_check_host(gm, off, (int64_t)*n, 0, &e);
    if (r == -EFAULT)
        return REPLY_EIO;              /* a private page or past EOF: SIGBUS for the fault */
    if (r != 0 || *n == 0)
        return PASS;                   /* a pending punch: Python reads around it */
    uint64_t first = first_page(off), last = end_page(off + *n);
    if (runmap_is_uniform(gm->allocated, first, last, 1))   /* committed already: no charge moves */
        return runmap_set(f->cached, first, last, 1) == 0 ? REPLY_DATA : PASS;
    if (!runmap_is_uniform(gm->allocated, first, last, 0) || !charges_here(f, gm) || fast->zeros == NULL
            || *n > UFS_ZEROS)
        return PASS;                   /* part allocated: Python copies the allocated parts */
    /* never allocated: zeros, without allocating; the pages not yet cached are charged now, so their
       write-back never needs more memory (ENOMEM past the bounds: Python answers it, with its reason) */
    int64_t need = (int64_t)runmap_count(f->cached, 0, first, last) << UFS_PAGE_SHIFT;
    if (charge(f, need, 0) < 0)
        return PASS;
    if (runmap_set(f->cached, first, last, 1) < 0) {
        refund(f, need);
        return PASS;
    }
    return REPLY_ZEROS;
}

/* A write-back, state held. */
static enum action write_back_locked(struct ufs_file *f, struct gmem *gm, const char *buf, size_t size, int64_t off)
{
    struct gmem_err e;
    int r = gmem_check_host(gm, off, (int64_t)size, 1, &e);
    if (r == -EFAULT)
        return REPLY_EIO;
    if (r != 0)
        return PASS;
    uint64_t first = first_page(off), last = end_page(off + size);
    if (runmap_is_uniform(gm->allocated, first, last, 1)) {
        memcpy(f->base + off, buf, size);   /* under the lock: a punch cannot free it meanwhile */
        return REPLY_DATA;
    }
    if (!charges_here(f, gm))
        return PASS;
    /* first use allocates (the core's span), as host_write does; the fill charged the pages it handed
       out, so only a write-back racing its page's revocation commits more: charged, never refused */
    uint64_t before = uncommitted(f, gm, first, last), a, b;
    if (gmem_touch_span(gm, off, size, &a, &b) > 0) {
        if (!f->huge && f->memfd >= 0 && a == first && b == last) {
            /* a write into the memfd allocates exactly the pages it fills, without zeroing them first
               or mapping them here (what the floor server does) */
            if (pwrite(f->memfd, buf, size, off) != (ssize_t)size)
                return PASS;            /* Python allocates through the backend and reports the error */
        } else {
            if (madvise(f->base + (a << UFS_PAGE_SHIFT), (b - a) << UFS_PAGE_SHIFT, MADV_POPULATE_WRITE) != 0)
                return PASS;
            memcpy(f->base + off, buf, size);
        }
        if (gmem_set_allocated(gm, a, b, 0) < 0)
            return PASS;
    } else {
        memcpy(f->base + off, buf, size);
    }
    uint64_t after = uncommitted(f, gm, first, last);
    if (before > after)
        charge(f, (int64_t)(before - after) << UFS_PAGE_SHIFT, 1);
    return REPLY_DATA;
}

/* ---- READ: a page fill ---- */
int ufs_fast_read(struct ufs_fast *fast, void *req, uint64_t ino, size_t size, int64_t off, uint64_t fh,
                  uint64_t lock_owner)
{
    if (!may_serve(fast) || lock_owner != 0 || off < 0)
        return passed(fast, ino, UFS_KIND_READ);
    struct ufs_file *f = file_of(fast, ino, fh, 0);
    if (f == NULL)
        return passed(fast, ino, UFS_KIND_READ);
    enum action act = PASS;
    uint64_t n = size;
    pthread_mutex_lock(&f->state);
    if (!f->closed && f->base != NULL && f->gm != NULL)
        act = fill_locked(fast, f, f->gm, off, &n);
    pthread_mutex_unlock(&f->state);
    if (act != PASS)    /* counted before the reply: a caller reading status after it sees this one */
        count_compiled(fast, UFS_KIND_READ);
    if (act == REPLY_DATA)
        fuse_reply_buf(req, f->base + off, n);   /* our reference keeps the mapping */
    else if (act == REPLY_ZEROS)
        fuse_reply_buf(req, fast->zeros, n);
    else if (act == REPLY_EIO)
        fuse_reply_err(req, EIO);
    request_done(f);
    return act == PASS ? passed(fast, ino, UFS_KIND_READ) : 1;
}

/* ---- WRITE: a write-back ---- */
int ufs_fast_write(struct ufs_fast *fast, void *req, uint64_t ino, const char *buf, size_t size, int64_t off,
                   uint64_t fh, int writepage)
{
    if (!may_serve(fast) || !writepage || off < 0 || size == 0)
        return passed(fast, ino, UFS_KIND_WRITE);
    struct ufs_file *f = file_of(fast, ino, fh, 0);
    if (f == NULL)
        return passed(fast, ino, UFS_KIND_WRITE);
    enum action act = PASS;
    pthread_mutex_lock(&f->state);
    if (!f->closed && f->base != NULL && f->gm != NULL)
        act = write_back_locked(f, f->gm, buf, size, off);
    pthread_mutex_unlock(&f->state);
    if (act != PASS)
        count_compiled(fast, UFS_KIND_WRITE);
    if (act == REPLY_DATA)
        fuse_reply_write(req, size);
    else if (act == REPLY_EIO)
        fuse_reply_err(req, EIO);
    request_done(f);
    return act == PASS ? passed(fast, ino, UFS_KIND_WRITE) : 1;
}

/* ---- ioctl(KVM_SET_MEMORY_ATTRIBUTES2) ---- */
struct parts {
    uint64_t *start, *end;       /* byte ranges */
    size_t n, cap;
};

static int parts_add(struct parts *p, uint64_t start, uint64_t end)
{
    if (p->n && p->end[p->n - 1] == start) {
        p->end[p->n - 1] = end;
        return 0;
    }
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 8;
        uint64_t *s = realloc(p->start, cap * sizeof(*s));
        if (s == NULL)
            return -ENOMEM;
        p->start = s;
        uint64_t *e = realloc(p->end, cap * sizeof(*e));
        if (e == NULL)
            return -ENOMEM;
        p->end = e;
        p->cap = cap;
    }
    p->start[p->n] = start;
    p->end[p->n] = end;
    p->n++;
    return 0;
}

/* For a to-private request on a well-formed range [first, last): 1 if the C path may run it, i.e. if any
   page is cached, a write-back descriptor is registered (Python opens one), and every cached page is
   allocated unless C may move the file's charge (revoking an unallocated cached page releases it). */
static int to_private_ours(struct ufs_file *f, struct gmem *gm, uint64_t first, uint64_t last)
{
    uint64_t starts[RUNS_AT_ONCE], cursor = first;
    int64_t values[RUNS_AT_ONCE];
    if (runmap_is_uniform(f->cached, first, last, 0))
        return 1;
    if (f->wb_fd < 0)
        return 0;
    if (charges_here(f, gm))
        return 1;
    while (cursor < last) {
        uint64_t got = runmap_runs(f->cached, &cursor, last, starts, values, RUNS_AT_ONCE);
        for (uint64_t i = 0; i < got; i++) {
            uint64_t end = i + 1 < got ? starts[i + 1] : cursor;
            if (values[i] && !runmap_is_uniform(gm->allocated, starts[i], end, 1))
                return 0;
        }
        if (got == 0)
            break;
    }
    return 1;
}

/* The cached runs inside the pending transition's ranges (byte ranges), and the bytes it revokes. */
static int collect_parts(struct ufs_file *f, struct gmem *gm, struct parts *parts, uint64_t *revoked)
{
    uint64_t rs[RUNS_AT_ONCE], re[RUNS_AT_ONCE], rcursor = 0;
    *revoked = 0;
    for (;;) {
        uint64_t nr = gmem_pending_revoke(gm, &rcursor, rs, re, RUNS_AT_ONCE);
        if (nr == 0)
            return 0;
        for (uint64_t k = 0; k < nr; k++) {
            *revoked += re[k] - rs[k];
            uint64_t first = rs[k] >> UFS_PAGE_SHIFT, last = (re[k] + UFS_PAGE_SIZE - 1) >> UFS_PAGE_SHIFT;
            if (runmap_is_uniform(f->cached, first, last, 0))
                continue;
            uint64_t starts[RUNS_AT_ONCE], cursor = first;
            int64_t values[RUNS_AT_ONCE];
            while (cursor < last) {
                uint64_t got = runmap_runs(f->cached, &cursor, last, starts, values, RUNS_AT_ONCE);
                for (uint64_t i = 0; i < got; i++) {
                    uint64_t end = i + 1 < got ? starts[i + 1] : cursor;
                    if (values[i] && parts_add(parts, starts[i] << UFS_PAGE_SHIFT, end << UFS_PAGE_SHIFT))
                        return -ENOMEM;
                }
                if (got == 0)
                    break;
            }
        }
    }
}

/* Mark the parts possibly cached (1) or not (0), keeping the file's charge (transitions.py's
   _mark_cached): unmarking an unallocated page gives its charge back, re-marking it (fail closed) takes
   it again, never refused. State held. */
static void mark_parts(struct ufs_file *f, struct gmem *gm, const struct parts *parts, int64_t value)
{
    if (parts->n == 0)
        return;
    uint64_t first = first_page(parts->start[0]), last = end_page(parts->end[parts->n - 1]);
    int counting = charges_here(f, gm);
    uint64_t before = counting ? uncommitted(f, gm, first, last) : 0;
    for (size_t i = 0; i < parts->n; i++)
        runmap_set(f->cached, parts->start[i] >> UFS_PAGE_SHIFT, parts->end[i] >> UFS_PAGE_SHIFT, value);
    if (!counting)
        return;
    uint64_t after = uncommitted(f, gm, first, last);
    if (after > before)
        refund(f, (int64_t)(after - before) << UFS_PAGE_SHIFT);
    else if (before > after)
        charge(f, (int64_t)(before - after) << UFS_PAGE_SHIFT, 1);
}

/* Write back, then unmap, the parts (revoke.py's InodeInvalidator.revoke with a descriptor); 0 or -errno. */
static int revoke_parts(struct ufs_fast *fast, struct ufs_file *f, int wb_fd, const struct parts *parts)
{
    unsigned flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    for (size_t i = 0; i < parts->n && wb_fd >= 0; i++)
        if (sync_file_range(wb_fd, parts->start[i], parts->end[i] - parts->start[i], flags) != 0)
            break;             /* as write_back(): the invalidation below launders what is left */
    for (size_t i = 0; i < parts->n; i++) {
        int err = fuse_lowlevel_notify_inval_inode(fast->se, f->ino, parts->start[i], parts->end[i] - parts->start[i]);
        if (err < 0 && err != -ENOENT)   /* ENOENT: the kernel caches no such inode, nothing is mapped */
            return err;
    }
    return 0;
}

/* The file of a request that may revoke (a conversion, an fallocate), holding what such a request must
   hold first, both taken without waiting: an inline slot (the deadlock rule: at most INLINE_SLOTS
   requests that may wait run on libfuse's workers, docs/architecture.md) and the file's invalidate lock.
   NULL with nothing held if the file is not one C serves, or either is busy: Python then queues the
   request behind the transition that runs. */
static struct ufs_file *transition_begin(struct ufs_fast *fast, uint64_t ino, uint64_t fh)
{
    struct ufs_file *f = file_of(fast, ino, fh, 1);
    if (f == NULL)
        return NULL;
    if (f->gm == NULL || !ufs_fast_inline_take(fast)) {
        request_done(f);
        return NULL;
    }
    if (pthread_mutex_trylock(&f->inval) != 0) {
        ufs_fast_inline_give(fast);
        request_done(f);
        return NULL;
    }
    return f;
}

/* Once the transition is over (the state lock released): give back what transition_begin took, close the
   write-back descriptor if Python evicted it while the revocation used it, free the parts. The file's own
   reference is dropped by the caller, after its reply. */
static void transition_end(struct ufs_fast *fast, struct ufs_file *f, int wb_fd, struct parts *parts)
{
    pthread_mutex_unlock(&f->inval);
    ufs_fast_inline_give(fast);
    if (wb_fd >= 0)
        close(wb_fd);
    free(parts->start);
    free(parts->end);
}

int ufs_fast_ioctl(struct ufs_fast *fast, void *req, uint64_t ino, unsigned int cmd, uint64_t fh,
                   unsigned int flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    if (!may_serve(fast) || cmd != UFS_KVM_SET_MEMORY_ATTRIBUTES2
            || (flags & FUSE_IOCTL_COMPAT) || in_bufsz != UFS_ATTRIBUTES2_SIZE || out_bufsz != UFS_ATTRIBUTES2_SIZE
            || fast->se == NULL)
        return passed(fast, ino, UFS_KIND_IOCTL);
    struct ufs_file *f = transition_begin(fast, ino, fh);
    if (f == NULL)
        return passed(fast, ino, UFS_KIND_IOCTL);
    struct gmem *gm = f->gm;
    uint64_t arg[UFS_ATTRIBUTES2_SIZE / 8];
    memcpy(arg, in_buf, sizeof(arg));
    uint64_t offset = arg[0], size = arg[1], attributes = arg[2], aflags = arg[3];
    struct parts parts = {0};
    uint64_t revoked = 0;
    int wb_fd = -1, served = 0, reply_err = 0, r = 0;
    struct gmem_err e = {0};

    pthread_mutex_lock(&f->state);
    if (f->closed || f->private_active || !f->in_place_conversion)
        goto unlock_pass;
    if (attributes == UFS_PRIVATE && size > 0 && offset < gm->size && size <= gm->size - offset
            && !((offset | size) & (UFS_PAGE_SIZE - 1))
            && !to_private_ours(f, gm, offset >> UFS_PAGE_SHIFT, (offset + size) >> UFS_PAGE_SHIFT))
        goto unlock_pass;
    r = gmem_prepare_set_memory_attributes(gm, offset, size, attributes, aflags, &arg[5], 11, &e);
    if (r <= 0) {          /* refused, a no-op, or to shared (applied): the answer is known */
        pthread_mutex_unlock(&f->state);
        served = 1;
        goto reply;
    }
    if (collect_parts(f, gm, &parts, &revoked) != 0) {
        gmem_abort(gm);
        goto unlock_pass;
    }
    mark_parts(f, gm, &parts, 0);    /* before revoking: a page read meanwhile is marked again, for the next one */
    if (parts.n)
        wb_fd = f->wb_inuse = f->wb_fd;   /* kept open until we are done, whatever Python evicts meanwhile */
    pthread_mutex_unlock(&f->state);

    int err = parts.n ? revoke_parts(fast, f, wb_fd, &parts) : 0;
    pthread_mutex_lock(&f->state);
    if (wb_fd >= 0) {
        f->wb_inuse = -1;
        if (f->wb_fd == wb_fd)
            wb_fd = -1;        /* still registered: not ours to close below */
    }
    if (err) {             /* fail closed: still possibly mapped, the attribute unchanged */
        mark_parts(f, gm, &parts, 1);
        gmem_abort(gm);
        reply_err = -err;
    } else {
        r = gmem_commit(gm);
        if (r < 0) {       /* nothing changed, still pending: abort, as the runner does */
            mark_parts(f, gm, &parts, 1);
            gmem_abort(gm);
            reply_err = -r;
        } else if (revoked) {
            gmem_count_revocation(gm, revoked);
        }
    }
    pthread_mutex_unlock(&f->state);
    served = 1;
    r = reply_err ? -reply_err : 0;
    goto reply;

unlock_pass:
    pthread_mutex_unlock(&f->state);
reply:
    transition_end(fast, f, wb_fd, &parts);
    if (served) {
        count_compiled(fast, UFS_KIND_IOCTL);
        if (r == 0 || r == 1) {
            fuse_reply_ioctl(req, 0, NULL, 0);          /* success copies nothing back (as Python) */
        } else if (reply_err) {
            fuse_reply_err(req, reply_err);
        } else if (e.has_offset) {                      /* EAGAIN/ENOMEM: the struct goes back with it */
            memcpy((char *)arg + UFS_ERROR_OFFSET_AT, &e.offset, 8);
            fuse_reply_ioctl(req, -e.err, arg, sizeof(arg));
        } else {
            fuse_reply_err(req, e.err ? e.err : -r);
        }
    }
    request_done(f);
    return served ? 1 : passed(fast, ino, UFS_KIND_IOCTL);
}

/* ---- fallocate(2): allocate (KEEP_SIZE) or punch (KEEP_SIZE|PUNCH_HOLE) ---- */
#define UFS_FALLOC_PUNCH_HOLE 0x02

/* An allocation, state held (conversions.py's fallocate: the core's check, then charges.committing around
   the backend's allocate and the core's set_allocated): 0 or -errno to reply; 1 to pass with nothing changed. */
static int allocate_locked(struct ufs_file *f, struct gmem *gm, uint64_t offset, uint64_t length)
{
    uint64_t first = offset >> UFS_PAGE_SHIFT, last = (offset + length) >> UFS_PAGE_SHIFT;   /* aligned */
    int64_t need = (int64_t)uncommitted(f, gm, first, last) << UFS_PAGE_SHIFT;
    if (charge(f, need, 0) < 0)
        return -ENOMEM;                /* past the owner's bound or the mount's cap: nothing changed */
    /* what MemfdBackend.allocate does, on the same mapping: the pages are the backend's as if Python had
       faulted them in (its smaps, e.g. thp's huge_bytes, say the same) */
    if (madvise(f->falloc_map + offset, length, MADV_POPULATE_WRITE) != 0
            || gmem_set_allocated(gm, first, last, 1) < 0) {
        refund(f, need);
        return 1;                      /* Python allocates again and answers with its error */
    }
    return 0;
}

/* Pages of [first, last) possibly cached: whether a punch of them needs the write-back descriptor. */
static int any_cached(struct ufs_file *f, uint64_t first, uint64_t last)
{
    return first < last && !runmap_is_uniform(f->cached, first, last, 0);
}

int ufs_fast_fallocate(struct ufs_fast *fast, void *req, uint64_t ino, int mode, int64_t offset, int64_t length,
                       uint64_t fh)
{
    if (!may_serve(fast) || fast->se == NULL)
        return passed(fast, ino, UFS_KIND_FALLOCATE);
    struct ufs_file *f = transition_begin(fast, ino, fh);   /* an allocation may wait in reclaim too */
    if (f == NULL)
        return passed(fast, ino, UFS_KIND_FALLOCATE);
    struct gmem *gm = f->gm;
    struct parts parts = {0};
    uint64_t revoked = 0, end, first, last, before, after;
    int wb_fd = -1, served = 0, reply_err = 0, r, err;
    struct gmem_err e = {0};

    pthread_mutex_lock(&f->state);
    if (f->closed || f->private_active || f->falloc_map == NULL || !charges_here(f, gm))
        goto unlock_pass;
    r = gmem_check_fallocate(gm, mode, offset, length, &e);
    if (r < 0) {               /* the kernel's errno (EINVAL, EOPNOTSUPP, EFBIG), nothing changed */
        reply_err = e.err;
        goto unlock_served;
    }
    if (!(mode & UFS_FALLOC_PUNCH_HOLE)) {
        r = allocate_locked(f, gm, (uint64_t)offset, (uint64_t)length);
        if (r > 0)
            goto unlock_pass;
        reply_err = -r;
        goto unlock_served;
    }
    /* a punch: its cached pages are written back through our descriptor (else Python opens one) */
    end = (uint64_t)offset + (uint64_t)length < gm->size ? (uint64_t)offset + (uint64_t)length : gm->size;
    if ((uint64_t)offset < end && f->wb_fd < 0
            && any_cached(f, (uint64_t)offset >> UFS_PAGE_SHIFT, end_page(end)))
        goto unlock_pass;
    r = gmem_prepare_punch(gm, (uint64_t)offset, (uint64_t)length);
    if (r == 0)                /* at or past EOF: succeeds, does nothing */
        goto unlock_served;
    if (r < 0)                 /* another transition pending: impossible with the lock held; Python says so */
        goto unlock_pass;
    if (collect_parts(f, gm, &parts, &revoked) != 0) {
        gmem_abort(gm);
        goto unlock_pass;
    }
    mark_parts(f, gm, &parts, 0);    /* before revoking: a page read meanwhile is marked again */
    if (parts.n)
        wb_fd = f->wb_inuse = f->wb_fd;
    pthread_mutex_unlock(&f->state);

    err = parts.n ? revoke_parts(fast, f, wb_fd, &parts) : 0;
    pthread_mutex_lock(&f->state);
    if (wb_fd >= 0) {
        f->wb_inuse = -1;
        if (f->wb_fd == wb_fd)
            wb_fd = -1;        /* still registered: not ours to close below */
    }
    if (!err && (f->closed || f->private_active)) {
        /* the private view served a page meanwhile (Python revokes it too) or the file is going: undo,
           which leaves the state as it was (the pages are only unmapped), and let Python punch */
        mark_parts(f, gm, &parts, 1);
        gmem_abort(gm);
        goto unlock_pass;
    }
    if (err) {                 /* fail closed: still possibly mapped, nothing punched */
        mark_parts(f, gm, &parts, 1);
        gmem_abort(gm);
        reply_err = -err;
        goto unlock_served;
    }
    /* the commit, with the recount of transitions.py's _recounting: the memory the punch frees goes back */
    first = gm->pending_start >> UFS_PAGE_SHIFT;
    last = end_page(gm->pending_end);
    before = uncommitted(f, gm, first, last);
    if (fallocate(f->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)gm->pending_start,
                  (off_t)(gm->pending_end - gm->pending_start)) != 0) {
        reply_err = errno;
        mark_parts(f, gm, &parts, 1);
        gmem_abort(gm);
        goto unlock_served;
    }
    r = gmem_commit(gm);
    if (r < 0) {               /* nothing changed in the maps, still pending: abort, as the runner does */
        mark_parts(f, gm, &parts, 1);
        gmem_abort(gm);
        reply_err = -r;
        goto unlock_served;
    }
    after = uncommitted(f, gm, first, last);
    if (after > before)
        refund(f, (int64_t)(after - before) << UFS_PAGE_SHIFT);
    gmem_count_revocation(gm, revoked);   /* a punch always revokes its range, cached or not (as Python) */

unlock_served:
    served = 1;
unlock_pass:
    pthread_mutex_unlock(&f->state);
    transition_end(fast, f, wb_fd, &parts);
    if (served) {
        count_compiled(fast, UFS_KIND_FALLOCATE);
        fuse_reply_err(req, reply_err);
    }
    request_done(f);
    return served ? 1 : passed(fast, ino, UFS_KIND_FALLOCATE);
}
