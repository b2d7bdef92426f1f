/*
 * gmem: one guest_memfd file's rules and state, compiled. The only copy of the rules: the FUSE server's
 * hot path (ufsgmem/fuse/fastpath.c) calls these directly, and ufsgmem/gmem.py (GuestMemfd) is a Python
 * binding over them, so the in-process core, the conformance suite, the policy replay and the server all
 * run this code. It mirrors virt/kvm/guest_memfd.c (6.18) plus the in-place conversion series v8, errno
 * for errno (docs/design.md §7 has the facts and their sources).
 *
 * What is here: the checks (in the kernel's order, first failure wins), the attribute, pin and allocation
 * maps, the pending transition, the counters and the whole-huge-folio count. What is not: memory (the
 * backend's, reached by the caller), FUSE, messages (an error names its reason, GMEM_WHY_*, and the
 * values it was about; the binding turns that into the message text), locks (the caller holds its own:
 * every function here assumes the file's state lock is held).
 *
 * Conventions: byte offsets are uint64_t/int64_t as the kernel gets them (signed where a negative value
 * must be refused rather than wrap), page ranges [first, last) are page indices; functions return 0 or a
 * positive result, or a negative errno with *e filled.
 */
#ifndef UFSGMEM_GMEM_H
#define UFSGMEM_GMEM_H

#include <stdint.h>
#include "runmap.h"

#define GMEM_PAGE_SHIFT 12
#define GMEM_PAGE_SIZE (1ull << GMEM_PAGE_SHIFT)

#define GMEM_SHARED 0
#define GMEM_PRIVATE 8                       /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
#define GMEM_FLAG_MMAP 1ull                  /* GUEST_MEMFD_FLAG_MMAP */
#define GMEM_FLAG_INIT_SHARED 2ull           /* GUEST_MEMFD_FLAG_INIT_SHARED */

/* Why a call failed: the binding's message table is indexed by these (keep both in step). */
enum gmem_why {
    GMEM_WHY_NONE = 0,
    /* creation */
    GMEM_WHY_CREATE_FLAGS, GMEM_WHY_CREATE_SIZE, GMEM_WHY_CREATE_UNALIGNED, GMEM_WHY_CREATE_HUGE_INIT_SHARED,
    GMEM_WHY_CREATE_HUGE_SIZE,
    /* fallocate */
    GMEM_WHY_FALLOC_RANGE, GMEM_WHY_FALLOC_VFS_MODE, GMEM_WHY_FALLOC_EFBIG, GMEM_WHY_FALLOC_NO_KEEP_SIZE,
    GMEM_WHY_FALLOC_MODE, GMEM_WHY_FALLOC_UNALIGNED, GMEM_WHY_FALLOC_PAST_EOF,
    /* KVM_SET_MEMORY_ATTRIBUTES2 */
    GMEM_WHY_ATTR_FLAGS, GMEM_WHY_ATTR_RESERVED, GMEM_WHY_ATTR_UNKNOWN, GMEM_WHY_ATTR_RANGE, GMEM_WHY_ATTR_UNALIGNED,
    GMEM_WHY_ATTR_PAST_EOF, GMEM_WHY_ATTR_PINNED,
    /* attribute queries */
    GMEM_WHY_QUERY_UNALIGNED, GMEM_WHY_QUERY_RANGE,
    /* pins */
    GMEM_WHY_PIN_RANGE, GMEM_WHY_PIN_PAST_EOF, GMEM_WHY_PIN_NO_MMAP, GMEM_WHY_PIN_PRIVATE, GMEM_WHY_UNPIN_NOT_PINNED,
    /* host and guest accesses */
    GMEM_WHY_HOST_NO_MMAP, GMEM_WHY_HOST_PRIVATE, GMEM_WHY_HOST_PAST_EOF, GMEM_WHY_HOST_CONVERTING,
    GMEM_WHY_HOST_PUNCH_PENDING, GMEM_WHY_GUEST_RANGE,
    GMEM_WHY_NOMEM,
    GMEM_WHY_BUSY,           /* a transition was prepared while another is pending: a caller's bug (EBUSY) */
    GMEM_WHY_COUNT
};

struct gmem_err {
    int err;                 /* positive errno */
    int why;                 /* enum gmem_why */
    int has_offset;          /* error_offset is reported (EAGAIN/ENOMEM of the ioctl, host faults) */
    uint64_t offset;         /* error_offset, or where a host access faults */
    int64_t a, b;            /* the values the message names (see each GMEM_WHY_* in gmem.c) */
};

enum gmem_kind { GMEM_NO_TRANSITION = 0, GMEM_TO_PRIVATE = 1, GMEM_PUNCH_HOLE = 2 };

struct gmem_counters {
    int64_t to_private, to_shared, noop_conversions, revocations, revoked_bytes, punches, allocations,
            folio_splits, folio_merges, eagain;
};

struct gmem {
    uint64_t size, flags, folio_size, npages;
    struct runmap *attrs;        /* page -> GMEM_SHARED / GMEM_PRIVATE */
    struct runmap *pins;         /* page -> emulated long-term pin count */
    struct runmap *allocated;    /* page -> 1 if the backend holds memory for it */
    int pending_kind;            /* enum gmem_kind: the transition between prepare and commit/abort */
    uint64_t pending_start, pending_end;   /* its byte range */
    struct gmem_counters counters;
    int64_t whole;               /* allocated huge folios with no shared page (kept by every change) */
    int refs;                    /* holders (gmem_get/gmem_put, atomic): the struct is freed by the last */
};

/* --- lifetime --- */
int gmem_check_create(int64_t size, int64_t flags, uint64_t folio_size, struct gmem_err *e);
/* NULL when out of memory; the caller holds the one reference (refs == 1) */
struct gmem *gmem_new(uint64_t size, uint64_t flags, uint64_t folio_size, int preallocated);
void gmem_free(struct gmem *gm);                 /* now, whatever refs says: for a struct never shared */
/* Holders: the Python binding holds the reference gmem_new gave it until GuestMemfd.close(); the FUSE
 * side takes its own (gmem_get) for as long as it may use the struct without the binding, and drops it
 * (gmem_put). The last gmem_put frees (returns 1 then). The state itself is guarded by the file's state
 * lock, not by this count: the count only decides when the memory may go. */
void gmem_get(struct gmem *gm);
int gmem_put(struct gmem *gm);

/* --- fallocate: the VFS's checks, then guest_memfd's --- */
int gmem_vfs_fallocate_mode(int64_t mode);       /* 1: a mode word the VFS passes to the filesystem */
int gmem_check_fallocate(const struct gmem *gm, int64_t mode, int64_t offset, int64_t length, struct gmem_err *e);
/* the backend has allocated pages [first, last); count_allocation: an fallocate (counters.allocations) */
int gmem_set_allocated(struct gmem *gm, uint64_t first, uint64_t last, int count_allocation);
/* first use of bytes [offset, offset + size): 1 and the folio-aligned page span to allocate, or 0 */
int gmem_touch_span(const struct gmem *gm, uint64_t offset, uint64_t size, uint64_t *first, uint64_t *last);

/* --- transitions (callers serialise them: the kernel's invalidate lock) --- */
/* 0: nothing more to do (a no-op, or private->shared, applied now); 1: a to-private transition is pending;
 * -EBUSY (GMEM_WHY_BUSY) when one already is: callers serialise transitions */
int gmem_prepare_set_memory_attributes(struct gmem *gm, uint64_t offset, uint64_t size, uint64_t attributes,
                                       uint64_t flags, const uint64_t *reserved, int nreserved,
                                       struct gmem_err *e);
/* after gmem_check_fallocate of a punch: 0 nothing to do (at or past EOF), 1 a punch is pending,
 * -EBUSY another transition is */
int gmem_prepare_punch(struct gmem *gm, uint64_t offset, uint64_t length);
/* the byte ranges the pending transition must revoke, read in pieces as runmap_runs is: *cursor a byte
 * offset, 0 to start; fewer than max ranges returned means these were the last (*cursor == pending_end) */
uint64_t gmem_pending_revoke(const struct gmem *gm, uint64_t *cursor, uint64_t *starts, uint64_t *ends,
                             uint64_t max);
/* a punch: after the backend punched. -ENOMEM: nothing changed, still pending (the caller aborts) */
int gmem_commit(struct gmem *gm);
void gmem_abort(struct gmem *gm);
void gmem_count_revocation(struct gmem *gm, uint64_t bytes);

/* --- accesses: 0 allowed; -EFAULT a host fault at e->offset; -EAGAIN (read) a punch of it is pending --- */
int gmem_check_host(const struct gmem *gm, int64_t offset, int64_t size, int writing, struct gmem_err *e);
int gmem_check_guest(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e);

/* --- pins --- */
int gmem_check_pin(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e);
int gmem_pin(struct gmem *gm, uint64_t offset, uint64_t size);          /* after gmem_check_pin + touch */
int gmem_unpin(struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e);

/* --- queries --- */
int gmem_check_query(const struct gmem *gm, int64_t offset, int64_t size, struct gmem_err *e);
void gmem_folio_counts(const struct gmem *gm, int64_t *whole, int64_t *split);

#endif
