/*
 * gmem: one guest_memfd file's rules and state, compiled (see gmem.h for what is here and what is not).
 *
 * Every check is written once, here, in the kernel's order: the first failure wins and fills struct
 * gmem_err with the errno, the reason (GMEM_WHY_*) and the values the message names. The binding
 * (ufsgmem/gmem.py, _MESSAGES) turns a reason into the text; what a and b hold for each reason is
 * written next to the check that sets it, and the binding's table (_VALUES) names them the same way.
 *
 * Why the huge-folio count is kept rather than derived on demand: status() is read on every status file
 * read and must not cost a walk of the maps, so every change to the attribute or allocation maps goes
 * through tracked_set(), which recounts only the folios the change overlaps, before and after.
 *
 * Why arguments are signed where the kernel's are unsigned: the VFS and the ioctls refuse negative
 * offsets and sizes with EINVAL, and a caller written in Python hands us whatever integer it got; a value
 * that fits no int64 is mapped by the binding to one that fails the same check (see gmem.py _clamp).
 */
#include <errno.h>
#include <stdlib.h>

#include "gmem.h"

#define PAGE_MASK (GMEM_PAGE_SIZE - 1)
#define LOFF_MAX INT64_MAX

/* fallocate(2) mode bits (uapi/linux/falloc.h) */
#define FL_KEEP_SIZE 0x01
#define FL_PUNCH_HOLE 0x02
#define FL_COLLAPSE_RANGE 0x08
#define FL_ZERO_RANGE 0x10
#define FL_INSERT_RANGE 0x20
#define FL_UNSHARE_RANGE 0x40
#define FL_WRITE_ZEROES 0x80

/* runs read from a runmap at a time while walking a range (on the stack: 1 KiB) */
#define RUNS_BATCH 64

static int fail(struct gmem_err *e, int err, int why, int64_t a, int64_t b)
{
    e->err = err;
    e->why = why;
    e->has_offset = 0;
    e->offset = 0;
    e->a = a;
    e->b = b;
    return -err;
}

static int fail_at(struct gmem_err *e, int err, int why, uint64_t offset, int64_t a, int64_t b)
{
    fail(e, err, why, a, b);
    e->has_offset = 1;
    e->offset = offset;
    return -err;
}

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

/* pages per folio: 1 for 4 KiB backends */
static uint64_t folio_pages(const struct gmem *gm) { return gm->folio_size >> GMEM_PAGE_SHIFT; }

/* --- whole-folio tracking --------------------------------------------------------------------------- */

/* Allocated folios inside the folio-aligned span of pages [first, last) with no shared page. Allocation
 * is folio-granular, so allocated pages / pages per folio counts folios. */
static int64_t whole_folios(const struct gmem *gm, uint64_t first, uint64_t last)
{
    uint64_t step = folio_pages(gm), starts[RUNS_BATCH], cursor;
    int64_t values[RUNS_BATCH], whole = 0;

    if (step <= 1)
        return 0;
    first -= first % step;
    last = min_u64((last + step - 1) / step * step, gm->npages);
    cursor = first;
    while (cursor < last) {
        uint64_t n = runmap_runs(gm->attrs, &cursor, last, starts, values, RUNS_BATCH);
        if (n == 0)
            break;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t s = starts[i], e = i + 1 < n ? starts[i + 1] : cursor;
            uint64_t b0 = (s + step - 1) / step * step, b1 = e - e % step;
            if (values[i] == GMEM_PRIVATE && b0 < b1)
                whole += runmap_count(gm->allocated, 1, b0, b1) / step;
        }
    }
    return whole;
}

/* Set pages [first, last) of map (attrs or allocated) to value and keep gm->whole right; *delta: how
 * many folios became whole (negative: split or freed). Only folios overlapping the range can change, so
 * this costs what the range costs, not the file. -ENOMEM leaves everything as it was. */
static int tracked_set(struct gmem *gm, struct runmap *map, uint64_t first, uint64_t last, int64_t value,
                       int64_t *delta)
{
    int64_t before = whole_folios(gm, first, last);
    int rc = runmap_set(map, first, last, value);

    *delta = 0;
    if (rc < 0)
        return rc;
    *delta = whole_folios(gm, first, last) - before;
    gm->whole += *delta;
    return 0;
}

/* Convert pages [first, last) and count it: a folio that loses its last shared page is merged, one that
 * gains a shared page is split. */
static int flip(struct gmem *gm, uint64_t first, uint64_t last, int64_t attributes)
{
    int64_t merged;
    int rc = tracked_set(gm, gm->attrs, first, last, attributes, &merged);

    if (rc < 0)
        return rc;
    if (attributes == GMEM_SHARED) {
        gm->counters.to_shared++;
        gm->counters.folio_splits -= merged;
    } else {
        gm->counters.to_private++;
        gm->counters.folio_merges += merged;
    }
    return 0;
}

void gmem_folio_counts(const struct gmem *gm, int64_t *whole, int64_t *split)
{
    uint64_t step = folio_pages(gm);

    if (step <= 1) {
        *whole = *split = 0;
        return;
    }
    *whole = gm->whole;
    *split = (int64_t)(runmap_count(gm->allocated, 1, 0, gm->npages) / step) - gm->whole;
}

/* --- lifetime ---------------------------------------------------------------------------------------- */

int gmem_check_create(int64_t size, int64_t flags, uint64_t folio_size, struct gmem_err *e)
{
    if (flags < 0 || flags & ~(int64_t)(GMEM_FLAG_MMAP | GMEM_FLAG_INIT_SHARED))
        return fail(e, EINVAL, GMEM_WHY_CREATE_FLAGS, flags, 0);                    /* a = flags */
    if (size <= 0)
        return fail(e, EINVAL, GMEM_WHY_CREATE_SIZE, size, 0);                      /* a = size */
    if ((uint64_t)size & PAGE_MASK)
        return fail(e, EINVAL, GMEM_WHY_CREATE_UNALIGNED, size, 0);                 /* a = size */
    /* (here the binding checks that the backend offers folio_size: plugins are not the rules' business) */
    if (folio_size > GMEM_PAGE_SIZE) {
        /* the HugeTLB series: huge-page files start private, and are made of whole huge pages */
        if (flags & GMEM_FLAG_INIT_SHARED)
            return fail(e, EINVAL, GMEM_WHY_CREATE_HUGE_INIT_SHARED, (int64_t)folio_size, 0);  /* a = folio */
        if ((uint64_t)size % folio_size)
            return fail(e, EINVAL, GMEM_WHY_CREATE_HUGE_SIZE, size, (int64_t)folio_size);   /* a = size, b = folio */
    }
    return 0;
}

struct gmem *gmem_new(uint64_t size, uint64_t flags, uint64_t folio_size, int preallocated)
{
    struct gmem *gm = calloc(1, sizeof(*gm));

    if (!gm)
        return NULL;
    gm->size = size;
    gm->flags = flags;
    gm->folio_size = folio_size;
    gm->npages = size >> GMEM_PAGE_SHIFT;
    gm->refs = 1;
    gm->attrs = runmap_new(gm->npages, flags & GMEM_FLAG_INIT_SHARED ? GMEM_SHARED : GMEM_PRIVATE);
    gm->pins = runmap_new(gm->npages, 0);
    gm->allocated = runmap_new(gm->npages, preallocated ? 1 : 0);
    if (!gm->attrs || !gm->pins || !gm->allocated) {
        gmem_free(gm);
        return NULL;
    }
    gm->whole = whole_folios(gm, 0, gm->npages);
    return gm;
}

void gmem_free(struct gmem *gm)
{
    if (!gm)
        return;
    runmap_free(gm->attrs);
    runmap_free(gm->pins);
    runmap_free(gm->allocated);
    free(gm);
}

void gmem_get(struct gmem *gm)
{
    __atomic_add_fetch(&gm->refs, 1, __ATOMIC_RELAXED);
}

int gmem_put(struct gmem *gm)
{
    /* acquire-release: whoever frees sees every change the other holders made before letting go */
    if (__atomic_sub_fetch(&gm->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return 0;
    gmem_free(gm);
    return 1;
}

/* --- fallocate --------------------------------------------------------------------------------------- */

int gmem_vfs_fallocate_mode(int64_t mode)
{
    /* Measured on Linux 6.18 by sweeping every mode below 0x200 with offset + length past LOFF_MAX:
     * exactly these give EFBIG, every other one EOPNOTSUPP. Modes are exclusive; only allocate,
     * zero-range and unshare may add KEEP_SIZE, and punch-hole must. */
    switch (mode) {
    case 0: case FL_KEEP_SIZE: case FL_PUNCH_HOLE | FL_KEEP_SIZE: case FL_COLLAPSE_RANGE:
    case FL_ZERO_RANGE: case FL_ZERO_RANGE | FL_KEEP_SIZE: case FL_INSERT_RANGE:
    case FL_UNSHARE_RANGE: case FL_UNSHARE_RANGE | FL_KEEP_SIZE: case FL_WRITE_ZEROES:
        return 1;
    default:
        return 0;
    }
}

int gmem_check_fallocate(const struct gmem *gm, int64_t mode, int64_t offset, int64_t length, struct gmem_err *e)
{
    /* the VFS's own checks first (vfs_fallocate), then guest_memfd's (kvm_gmem_fallocate) */
    if (offset < 0 || length <= 0)
        return fail(e, EINVAL, GMEM_WHY_FALLOC_RANGE, offset, length);           /* a = offset, b = length */
    if (!gmem_vfs_fallocate_mode(mode))
        return fail(e, EOPNOTSUPP, GMEM_WHY_FALLOC_VFS_MODE, mode, 0);           /* a = mode */
    /* both are non-negative int64 here, so the sum fits a uint64 */
    if ((uint64_t)offset + (uint64_t)length > (uint64_t)LOFF_MAX)
        return fail(e, EFBIG, GMEM_WHY_FALLOC_EFBIG, offset, length);            /* a = offset, b = length */
    if (!(mode & FL_KEEP_SIZE))
        return fail(e, EOPNOTSUPP, GMEM_WHY_FALLOC_NO_KEEP_SIZE, mode, 0);       /* a = mode */
    if (mode & ~(int64_t)(FL_KEEP_SIZE | FL_PUNCH_HOLE))
        return fail(e, EOPNOTSUPP, GMEM_WHY_FALLOC_MODE, mode, 0);               /* a = mode */
    if (((uint64_t)offset | (uint64_t)length) & (gm->folio_size - 1))
        return fail(e, EINVAL, GMEM_WHY_FALLOC_UNALIGNED, offset, length);       /* a = offset, b = length */
    if (!(mode & FL_PUNCH_HOLE) && (uint64_t)(offset + length) > gm->size)
        return fail(e, EINVAL, GMEM_WHY_FALLOC_PAST_EOF, offset, length);        /* a = offset, b = length */
    return 0;
}

int gmem_set_allocated(struct gmem *gm, uint64_t first, uint64_t last, int count_allocation)
{
    int64_t delta;
    int rc = tracked_set(gm, gm->allocated, first, last, 1, &delta);

    if (rc < 0)
        return rc;
    if (count_allocation)
        gm->counters.allocations++;
    return 0;
}

int gmem_touch_span(const struct gmem *gm, uint64_t offset, uint64_t size, uint64_t *first, uint64_t *last)
{
    uint64_t step = folio_pages(gm), f, l;

    if (size == 0)
        return 0;  /* an empty access uses no page */
    f = offset >> GMEM_PAGE_SHIFT;
    l = (offset + size + GMEM_PAGE_SIZE - 1) >> GMEM_PAGE_SHIFT;
    if (f >= l || runmap_is_uniform(gm->allocated, f, l, 1))
        return 0;
    /* first use allocates whole folios (a fresh page reads as zero: zeroed once, on first use) */
    *first = f - f % step;
    *last = min_u64((l + step - 1) / step * step, gm->npages);
    return 1;
}

/* --- transitions ------------------------------------------------------------------------------------- */

int gmem_prepare_set_memory_attributes(struct gmem *gm, uint64_t offset, uint64_t size, uint64_t attributes,
                                       uint64_t flags, const uint64_t *reserved, int nreserved,
                                       struct gmem_err *e)
{
    uint64_t first, last;
    int64_t pinned;

    /* v8's order; the first failure wins. (EFAULT, copying the struct in, belongs to the frontend.) */
    if (flags != 0)
        return fail(e, EINVAL, GMEM_WHY_ATTR_FLAGS, (int64_t)flags, 0);          /* a = flags */
    for (int i = 0; i < nreserved; i++)
        if (reserved[i])
            return fail(e, EINVAL, GMEM_WHY_ATTR_RESERVED, 0, 0);
    if (attributes & ~(uint64_t)GMEM_PRIVATE)
        return fail(e, EINVAL, GMEM_WHY_ATTR_UNKNOWN, (int64_t)attributes, 0);   /* a = attributes */
    if (size == 0 || offset + size < offset)  /* empty, or wrapping past 2^64 */
        return fail(e, EINVAL, GMEM_WHY_ATTR_RANGE, (int64_t)offset, (int64_t)size);  /* a = offset, b = size */
    if ((offset | size) & PAGE_MASK)
        return fail(e, EINVAL, GMEM_WHY_ATTR_UNALIGNED, (int64_t)offset, (int64_t)size);
    if (offset >= gm->size || offset + size > gm->size)
        return fail(e, EINVAL, GMEM_WHY_ATTR_PAST_EOF, (int64_t)offset, (int64_t)size);

    first = offset >> GMEM_PAGE_SHIFT;
    last = (offset + size) >> GMEM_PAGE_SHIFT;
    if (runmap_is_uniform(gm->attrs, first, last, (int64_t)attributes)) {
        gm->counters.noop_conversions++;
        return 0;  /* already so: no unmap, no reference check (a pinned no-op succeeds) */
    }
    if (attributes == GMEM_SHARED) {
        /* private -> shared needs no revocation: nothing on the host maps private memory */
        if (flip(gm, first, last, GMEM_SHARED) < 0)
            return fail_at(e, ENOMEM, GMEM_WHY_NOMEM, offset, (int64_t)offset, (int64_t)size);
        return 0;
    }
    /* shared -> private: a long-term pin holds a reference the kernel cannot take away */
    pinned = runmap_count(gm->pins, 0, 0, gm->npages) == gm->npages ? -1
             : runmap_first(gm->pins, first, last, RUNMAP_GT, 0);
    if (pinned >= 0) {
        gm->counters.eagain++;
        return fail_at(e, EAGAIN, GMEM_WHY_ATTR_PINNED, (uint64_t)pinned << GMEM_PAGE_SHIFT,
                       pinned << GMEM_PAGE_SHIFT, 0);                            /* a = the pinned page's offset */
    }
    if (gm->pending_kind != GMEM_NO_TRANSITION)
        return fail(e, EBUSY, GMEM_WHY_BUSY, gm->pending_kind, 0);               /* a = the pending kind */
    gm->pending_kind = GMEM_TO_PRIVATE;
    gm->pending_start = offset;
    gm->pending_end = offset + size;
    return 1;
}

int gmem_prepare_punch(struct gmem *gm, uint64_t offset, uint64_t length)
{
    uint64_t end = min_u64(offset + length, gm->size);

    if (offset >= end)
        return 0;  /* punching at or past EOF succeeds and does nothing */
    if (gm->pending_kind != GMEM_NO_TRANSITION)
        return -EBUSY;
    gm->pending_kind = GMEM_PUNCH_HOLE;
    gm->pending_start = offset;
    gm->pending_end = end;
    return 1;
}

uint64_t gmem_pending_revoke(const struct gmem *gm, uint64_t *cursor, uint64_t *starts, uint64_t *ends,
                             uint64_t max)
{
    uint64_t n = 0, pages[RUNS_BATCH], page, last;
    int64_t values[RUNS_BATCH];

    /* *cursor is a byte offset: 0 (or anything before the range) starts at the beginning; it ends at
     * pending_end, and a call that returns fewer than max ranges has returned the last of them */
    if (*cursor < gm->pending_start)
        *cursor = gm->pending_start;
    if (gm->pending_kind == GMEM_PUNCH_HOLE) {
        if (*cursor < gm->pending_end && max > 0) {
            starts[0] = *cursor;
            ends[0] = gm->pending_end;
            *cursor = gm->pending_end;
            return 1;
        }
        return 0;
    }
    if (gm->pending_kind != GMEM_TO_PRIVATE) {
        *cursor = gm->pending_end;
        return 0;
    }
    /* to private: only the shared runs of the range can be mapped, so only they are revoked */
    page = *cursor >> GMEM_PAGE_SHIFT;
    last = gm->pending_end >> GMEM_PAGE_SHIFT;
    while (page < last && n < max) {
        /* at most one range out per run in: never read more runs than there is room for */
        uint64_t want = min_u64(max - n, RUNS_BATCH);
        uint64_t got = runmap_runs(gm->attrs, &page, last, pages, values, want);
        if (got == 0)
            break;
        for (uint64_t i = 0; i < got; i++) {
            if (values[i] != GMEM_SHARED)
                continue;
            starts[n] = pages[i] << GMEM_PAGE_SHIFT;
            ends[n] = (i + 1 < got ? pages[i + 1] : page) << GMEM_PAGE_SHIFT;
            n++;
        }
    }
    *cursor = page << GMEM_PAGE_SHIFT;
    if (page >= last)
        *cursor = gm->pending_end;
    return n;
}

int gmem_commit(struct gmem *gm)
{
    uint64_t first = gm->pending_start >> GMEM_PAGE_SHIFT, last = gm->pending_end >> GMEM_PAGE_SHIFT;
    int64_t delta;
    int rc;

    switch (gm->pending_kind) {
    case GMEM_TO_PRIVATE:
        rc = flip(gm, first, last, GMEM_PRIVATE);
        break;
    case GMEM_PUNCH_HOLE:
        /* the backend has freed the memory already; -ENOMEM here leaves the map claiming it is held,
         * which costs a later first use its allocation, never a byte of content */
        rc = tracked_set(gm, gm->allocated, first, last, 0, &delta);
        if (rc == 0)
            gm->counters.punches++;
        break;
    default:
        return -EINVAL;
    }
    if (rc < 0)
        return rc;  /* still pending: the caller aborts, and the attribute is unchanged (fail closed) */
    gm->pending_kind = GMEM_NO_TRANSITION;
    return 0;
}

void gmem_abort(struct gmem *gm)
{
    gm->pending_kind = GMEM_NO_TRANSITION;
}

void gmem_count_revocation(struct gmem *gm, uint64_t bytes)
{
    gm->counters.revocations++;
    gm->counters.revoked_bytes += (int64_t)bytes;
}

/* --- accesses ---------------------------------------------------------------------------------------- */

int gmem_check_host(const struct gmem *gm, int64_t offset, int64_t size, int writing, struct gmem_err *e)
{
    uint64_t first, last, start, end;
    int64_t private;

    /* every fault: a = the access's offset, b = its size; e->offset = where it faults */
    if (!(gm->flags & GMEM_FLAG_MMAP))
        return fail_at(e, EFAULT, GMEM_WHY_HOST_NO_MMAP, (uint64_t)offset, offset, size);
    if (offset < 0 || size < 0 || (uint64_t)offset + (uint64_t)size > gm->size) {
        /* the access faults at its first bad byte: a private page inside the file comes before EOF */
        if (offset >= 0 && (uint64_t)offset < gm->size) {
            private = runmap_first(gm->attrs, (uint64_t)offset >> GMEM_PAGE_SHIFT, gm->npages, RUNMAP_EQ,
                                   GMEM_PRIVATE);
            if (private >= 0)
                return fail_at(e, EFAULT, GMEM_WHY_HOST_PRIVATE,
                               (uint64_t)max_i64(offset, private << GMEM_PAGE_SHIFT), offset, size);
        }
        return fail_at(e, EFAULT, GMEM_WHY_HOST_PAST_EOF, (uint64_t)max_i64(offset, (int64_t)gm->size),
                       offset, size);
    }
    if (size == 0)
        return 0;
    first = (uint64_t)offset >> GMEM_PAGE_SHIFT;
    last = ((uint64_t)offset + (uint64_t)size + GMEM_PAGE_SIZE - 1) >> GMEM_PAGE_SHIFT;
    start = first << GMEM_PAGE_SHIFT;
    end = last << GMEM_PAGE_SHIFT;
    if (gm->pending_kind != GMEM_NO_TRANSITION && gm->pending_start < end && start < gm->pending_end) {
        if (gm->pending_kind == GMEM_TO_PRIVATE) {
            if (writing)
                return 0;  /* dirty write-back during revocation: must be kept (design §3) */
            return fail_at(e, EFAULT, GMEM_WHY_HOST_CONVERTING,
                           (uint64_t)max_i64(offset, (int64_t)gm->pending_start), offset, size);
        }
        if (!writing)  /* a read of a range being punched: retry once the punch commits */
            return fail(e, EAGAIN, GMEM_WHY_HOST_PUNCH_PENDING, (int64_t)gm->pending_start,
                        (int64_t)gm->pending_end);                    /* a, b = the pending range */
    }
    private = runmap_first(gm->attrs, first, last, RUNMAP_EQ, GMEM_PRIVATE);
    if (private >= 0)
        return fail_at(e, EFAULT, GMEM_WHY_HOST_PRIVATE, (uint64_t)max_i64(offset, private << GMEM_PAGE_SHIFT),
                       offset, size);
    return 0;
}

int gmem_check_guest(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e)
{
    /* a vCPU reaches private and shared pages alike: only the file's bounds apply */
    if (offset < 0 || size < 0 || (uint64_t)offset + (uint64_t)size > gm->size)
        return fail(e, EINVAL, GMEM_WHY_GUEST_RANGE, offset, size);              /* a = offset, b = size */
    return 0;
}

/* --- pins -------------------------------------------------------------------------------------------- */

static int check_pin_range(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e)
{
    if (offset < 0 || size <= 0 || ((uint64_t)offset | (uint64_t)size) & PAGE_MASK)
        return fail(e, EINVAL, GMEM_WHY_PIN_RANGE, offset, size);                /* a = offset, b = size */
    if ((uint64_t)offset + (uint64_t)size > gm->size)
        return fail(e, EINVAL, GMEM_WHY_PIN_PAST_EOF, offset, size);             /* a = offset, b = size */
    return 0;
}

int gmem_check_pin(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e)
{
    int64_t private;
    int rc = check_pin_range(gm, offset, size, e);

    if (rc < 0)
        return rc;
    if (!(gm->flags & GMEM_FLAG_MMAP))  /* GUP needs a host mapping, and this file has none */
        return fail_at(e, EFAULT, GMEM_WHY_PIN_NO_MMAP, (uint64_t)offset, offset, size);
    private = runmap_first(gm->attrs, (uint64_t)offset >> GMEM_PAGE_SHIFT,
                           (uint64_t)(offset + size) >> GMEM_PAGE_SHIFT, RUNMAP_EQ, GMEM_PRIVATE);
    if (private >= 0)
        return fail_at(e, EFAULT, GMEM_WHY_PIN_PRIVATE, (uint64_t)private << GMEM_PAGE_SHIFT,
                       private << GMEM_PAGE_SHIFT, 0);                           /* a = the private page */
    return 0;
}

int gmem_pin(struct gmem *gm, uint64_t offset, uint64_t size)
{
    return runmap_add(gm->pins, offset >> GMEM_PAGE_SHIFT, (offset + size) >> GMEM_PAGE_SHIFT, 1);
}

int gmem_unpin(struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e)
{
    uint64_t first, last;
    int64_t unpinned;
    int rc = check_pin_range(gm, offset, size, e);

    if (rc < 0)
        return rc;
    first = (uint64_t)offset >> GMEM_PAGE_SHIFT;
    last = (uint64_t)(offset + size) >> GMEM_PAGE_SHIFT;
    unpinned = runmap_first(gm->pins, first, last, RUNMAP_EQ, 0);
    if (unpinned >= 0)
        return fail(e, EINVAL, GMEM_WHY_UNPIN_NOT_PINNED, unpinned << GMEM_PAGE_SHIFT, 0);  /* a = the page */
    if (runmap_add(gm->pins, first, last, -1) < 0)
        return fail(e, ENOMEM, GMEM_WHY_NOMEM, offset, size);
    return 0;
}

/* --- queries ----------------------------------------------------------------------------------------- */

int gmem_check_query(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e)
{
    /* alignment first, then the range (what get_attributes has always answered) */
    if (((uint64_t)offset | (uint64_t)size) & PAGE_MASK)
        return fail(e, EINVAL, GMEM_WHY_QUERY_UNALIGNED, offset, size);          /* a = offset, b = size */
    if (offset < 0 || size <= 0 || (uint64_t)offset + (uint64_t)size > gm->size)
        return fail(e, EINVAL, GMEM_WHY_QUERY_RANGE, offset, size);              /* a = offset, b = size */
    return 0;
}
