/*
 * fastpath: mem's page fills (READ), write-backs (WRITE), KVM_SET_MEMORY_ATTRIBUTES2 and fallocate(2) served
 * in C, with no Python on the common path. Everything else, and every case the C path is not sure of, goes to
 * Python (ufsgmem/fuse/lowlevel.py's py_* functions) with nothing changed, so Python stays the one place that
 * answers errors, charges memory and revokes in the cases the C path leaves out.
 *
 * State is per session (struct ufs_fast): the mem files (struct ufs_file, by inode), the open mem handles
 * (fh -> inode, writable), the inline-slot count shared with Python (the deadlock rule of
 * docs/architecture.md: at most UFS_INLINE_SLOTS workers run work that may wait, C and Python together),
 * the on/off switch (`ufsgmem mount --hot-path`) and per-kind counters of requests served here or passed on.
 *
 * A struct ufs_file is what both sides share of one mem file: the core's struct gmem (its own reference),
 * the state mutex (Python's Entry.state) and the invalidate lock (Entry.lock), the possibly-cached map
 * (Entry.cached), and the backend's memory mapped by C itself, so a copy in flight keeps that memory alive
 * even while the file is destroyed or the mount torn down (the last reference unmaps it).
 *
 * Lock order as in docs/architecture.md: inval, then state, then the session's tables (leaves). No call
 * into Python is ever made while one of them is held.
 */
#ifndef UFSGMEM_FASTPATH_H
#define UFSGMEM_FASTPATH_H

#include <stddef.h>
#include <stdint.h>

#define UFS_INLINE_SLOTS 8       /* lowlevel.py's INLINE_SLOTS: the one bound, kept here */

enum ufs_kind { UFS_KIND_READ = 0, UFS_KIND_WRITE = 1, UFS_KIND_IOCTL = 2, UFS_KIND_FALLOCATE = 3, UFS_KINDS = 4 };
enum ufs_lock { UFS_LOCK_STATE = 0, UFS_LOCK_INVAL = 1 };

struct ufs_fast;
struct ufs_file;
struct fuse_session;
struct runmap;
struct ufs_counter;

/* --- the session's part --- */
struct ufs_fast *ufs_fast_new(void *py);
void *ufs_fast_py(struct ufs_fast *fast);                 /* the Python session's handle */
void ufs_fast_set_session(struct ufs_fast *fast, struct fuse_session *se);
void ufs_fast_set_enabled(struct ufs_fast *fast, int enabled);
int ufs_fast_enabled(struct ufs_fast *fast);
void ufs_fast_free(struct ufs_fast *fast);                /* drops the files still registered */
/* --low-latency: while the hold is held (Python's latency.py raises it), C notes the time of each request
   it serves; while it is not, C passes requests to Python, whose hook raises it. */
void ufs_fast_set_hold(struct ufs_fast *fast, int wanted);
void ufs_fast_set_held(struct ufs_fast *fast, int held);
int64_t ufs_fast_last_ns(struct ufs_fast *fast);           /* CLOCK_MONOTONIC of the last one C served */
int ufs_fast_inline_take(struct ufs_fast *fast);          /* 1: a slot is ours (give it back), 0: none free */
void ufs_fast_inline_give(struct ufs_fast *fast);
void ufs_fast_counts(struct ufs_fast *fast, uint64_t *compiled, uint64_t *python);  /* [UFS_KINDS] each */
void ufs_fast_count_python(struct ufs_fast *fast, int kind);

/* --- files: 0 or a negative errno --- */
/* gmem: a struct gmem * from the core (0: none, never served here); memfd: the backend's memory, whose
   MAP_SHARED mapping of [0, size) is the storage (-1: none, never served here), mapped here and borrowed
   for writes until ufs_fast_remove_file (so close the backend only after that). */
struct ufs_file *ufs_file_new(uint64_t ino, uintptr_t gmem, uint64_t size, int memfd, int in_place_conversion,
                              int *err);
void ufs_file_put(struct ufs_file *file);
int ufs_fast_add_file(struct ufs_fast *fast, struct ufs_file *file);
void ufs_fast_remove_file(struct ufs_fast *fast, uint64_t ino);   /* and marks it closed: never served again */
void ufs_file_lock(struct ufs_file *file, int which);      /* blocking */
int ufs_file_trylock(struct ufs_file *file, int which);    /* 1 taken, 0 held elsewhere */
void ufs_file_unlock(struct ufs_file *file, int which);
struct runmap *ufs_file_cached(struct ufs_file *file);     /* Entry.cached (RunMap.wrap) */
void ufs_file_set_private_active(struct ufs_file *file);   /* the caller holds the state lock */
/* the write-back descriptor: the file owns fd from now on and closes it when replaced, dropped (-1) or
   freed (later, if a conversion is writing back through it) */
int ufs_file_set_write_back(struct ufs_file *file, int fd);
int ufs_file_memory_mapped(struct ufs_file *file);
void ufs_file_advise_huge(struct ufs_file *file);          /* the backend's own mapping asks for THP */
/* fallocate(2) may be served here: the backend allocates by MADV_POPULATE_WRITE of its own MAP_SHARED mapping
   of the memory at `mapping` and punches by fallocate(PUNCH_HOLE|KEEP_SIZE) of memfd, nothing more
   (Backend.fallocate_mapping). Borrowed as memfd is: valid until the backend is closed, which Python does
   only after ufs_fast_remove_file. Call before ufs_fast_add_file. */
void ufs_file_set_fallocate(struct ufs_file *file, uintptr_t mapping);
/* Memory charges (budget.py): the counters its charges go to (its owner's bound, the mount's cap), and
   its own charge in bytes, read and changed by Python with the state lock held. Without counters, C
   serves nothing that changes a charge. */
void ufs_file_set_counters(struct ufs_file *file, struct ufs_counter *user, struct ufs_counter *mount);
int64_t ufs_file_charged(struct ufs_file *file);
void ufs_file_set_charged(struct ufs_file *file, int64_t charged);

/* --- handles of mem --- */
int ufs_fast_open(struct ufs_fast *fast, uint64_t fh, uint64_t ino, int writable);
void ufs_fast_release(struct ufs_fast *fast, uint64_t fh);

/* --- the hot path: 1 served (the reply is sent), 0 not (nothing changed: the caller asks Python) --- */
int ufs_fast_read(struct ufs_fast *fast, void *req, uint64_t ino, size_t size, int64_t off, uint64_t fh,
                  uint64_t lock_owner);
int ufs_fast_write(struct ufs_fast *fast, void *req, uint64_t ino, const char *buf, size_t size, int64_t off,
                   uint64_t fh, int writepage);
int ufs_fast_ioctl(struct ufs_fast *fast, void *req, uint64_t ino, unsigned int cmd, uint64_t fh,
                   unsigned int flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz);
int ufs_fast_fallocate(struct ufs_fast *fast, void *req, uint64_t ino, int mode, int64_t offset, int64_t length,
                       uint64_t fh);

#endif
