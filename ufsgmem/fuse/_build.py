"""Build script for ``ufsgmem.fuse._lowlevel``: libfuse3's low-level API through cffi (API mode).

Run at install time (``setup.py``'s ``cffi_modules``), so ``./scripts/setup.sh`` on a fresh machine
compiles it against the Debian ``libfuse3-dev`` it has just installed. ``FUSE_USE_VERSION 312``: with 35
the 3.14 headers select the old ``fuse_session_loop_mt`` configuration, which starts a thread and clones
``/dev/fuse`` per request (3-5x slower, see design §8.1 in ``docs/design.md``).

The C glue here flattens every low-level callback's arguments into one ``extern "Python"`` call (so
Python never touches libfuse's bit-field structs), and a few ``ufs_*`` helpers fill the reply structs
from plain numbers. Things done in C on purpose:

* **mem's common READ, WRITE and conversion ioctl** are first offered to the compiled hot path
  (``fastpath.c``, with ``counter.c``), which is compiled into this module together with the core's own
  sources (``ufsgmem/core/runmap.c``, ``gmem.c``: the same rules the ``_core`` module binds, used here on
  a ``struct gmem`` made there and passed by address). It serves only the common case and otherwise
  returns, having changed nothing, and the request goes to Python as before.

* **the INIT reply is patched** in the session's ``writev`` (custom I/O): libfuse 3.14 has no API for
  ``FUSE_DIRECT_IO_ALLOW_MMAP`` (protocol 7.39), which ``mem`` needs to be opened with direct I/O and
  still be mapped shared. The first reply the session sends is INIT's; its ``flags`` get
  ``FUSE_INIT_EXT`` and its ``flags2`` the ALLOW_MMAP bit. Nothing else is touched.
* **FLUSH, RELEASEDIR and LISTXATTR** are answered in C: they carry no ufsgmem behaviour.

Everything else with behaviour is Python (``ufsgmem/fuse/lowlevel.py`` dispatches, ``ops.py`` decides).

``UFSGMEM_SANITIZE`` (a comma list of ``-fsanitize`` names, e.g. ``address,undefined``) builds the module
instrumented, the hot path and the core's sources with it: ``scripts/sanitize.sh`` sets it to build a
copy of the tree and run the FUSE tests against that copy. Unset (the normal install), the flags are the
plain ones.
"""

from __future__ import annotations

import os
import subprocess

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = os.path.join(os.path.dirname(HERE), "core")

CDEF = r"""
typedef uint64_t fuse_ino_t;
typedef struct fuse_req *fuse_req_t;
struct fuse_session;
struct fuse_file_info;

/* --- the session (ufs_* are the glue below) --- */
struct fuse_session *ufs_session_new(int argc, char **argv, void *userdata);
int fuse_session_mount(struct fuse_session *se, const char *mountpoint);
int ufs_session_custom_io(struct fuse_session *se);
int ufs_session_loop(struct fuse_session *se, unsigned max_threads);
int fuse_set_signal_handlers(struct fuse_session *se);
void fuse_remove_signal_handlers(struct fuse_session *se);
void fuse_session_exit(struct fuse_session *se);
int fuse_session_exited(struct fuse_session *se);
void fuse_session_unmount(struct fuse_session *se);
void fuse_session_destroy(struct fuse_session *se);
int fuse_session_fd(struct fuse_session *se);
const char *fuse_pkgversion(void);

/* --- notifications (block until the kernel is done; call where other threads keep serving) --- */
int fuse_lowlevel_notify_inval_inode(struct fuse_session *se, fuse_ino_t ino, int64_t off, int64_t len);
int fuse_lowlevel_notify_inval_entry(struct fuse_session *se, fuse_ino_t parent, const char *name,
                                     size_t namelen);

/* --- requests and replies --- */
void *fuse_req_userdata(fuse_req_t req);
int ufs_req_ctx(fuse_req_t req, uint32_t *uid, uint32_t *gid, int32_t *pid);
int fuse_reply_err(fuse_req_t req, int err);
void fuse_reply_none(fuse_req_t req);
int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size);
int fuse_reply_write(fuse_req_t req, size_t count);
int fuse_reply_xattr(fuse_req_t req, size_t count);
int fuse_reply_ioctl(fuse_req_t req, int result, const void *buf, size_t size);
int ufs_reply_attr(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid,
                   uint32_t gid, int64_t size, int64_t blksize, int64_t time_ns, double timeout);
int ufs_reply_entry(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid,
                    uint32_t gid, int64_t size, int64_t blksize, int64_t time_ns, double attr_timeout,
                    double entry_timeout);
int ufs_reply_open(fuse_req_t req, struct fuse_file_info *fi, uint64_t fh, int direct_io, int keep_cache,
                   int nonseekable, int noflush);
int ufs_reply_statfs(fuse_req_t req, unsigned long bsize, unsigned long namemax);
size_t ufs_add_direntry(fuse_req_t req, char *buf, size_t bufsize, const char *name, uint64_t ino,
                        uint32_t mode, int64_t off);

/* --- the compiled hot path (fastpath.h) --- */
struct ufs_fast;
struct ufs_file;
struct ufs_counter;
struct runmap;
struct ufs_counter *ufs_counter_new(int64_t bound);
void ufs_counter_put(struct ufs_counter *c);
int ufs_counter_take(struct ufs_counter *c, int64_t n, int force);
int ufs_counter_give(struct ufs_counter *c, int64_t n);
int64_t ufs_counter_held(struct ufs_counter *c);
#define UFS_INLINE_SLOTS ...
#define UFS_KINDS ...
#define UFS_LOCK_STATE ...
#define UFS_LOCK_INVAL ...
struct ufs_fast *ufs_fast_new(void *py);
void *ufs_fast_py(struct ufs_fast *fast);
void ufs_fast_set_session(struct ufs_fast *fast, struct fuse_session *se);
void ufs_fast_set_enabled(struct ufs_fast *fast, int enabled);
int ufs_fast_enabled(struct ufs_fast *fast);
void ufs_fast_free(struct ufs_fast *fast);
void ufs_fast_set_hold(struct ufs_fast *fast, int wanted);
void ufs_fast_set_held(struct ufs_fast *fast, int held);
int64_t ufs_fast_last_ns(struct ufs_fast *fast);
int ufs_fast_inline_take(struct ufs_fast *fast);
void ufs_fast_inline_give(struct ufs_fast *fast);
void ufs_fast_counts(struct ufs_fast *fast, uint64_t *compiled, uint64_t *python);
struct ufs_file *ufs_file_new(uint64_t ino, uintptr_t gmem, uint64_t size, int memfd, int in_place_conversion,
                              int *err);
void ufs_file_put(struct ufs_file *file);
int ufs_fast_add_file(struct ufs_fast *fast, struct ufs_file *file);
void ufs_fast_remove_file(struct ufs_fast *fast, uint64_t ino);
void ufs_file_lock(struct ufs_file *file, int which);
int ufs_file_trylock(struct ufs_file *file, int which);
void ufs_file_unlock(struct ufs_file *file, int which);
struct runmap *ufs_file_cached(struct ufs_file *file);
void ufs_file_set_private_active(struct ufs_file *file);
int ufs_file_set_write_back(struct ufs_file *file, int fd);
int ufs_file_memory_mapped(struct ufs_file *file);
void ufs_file_advise_huge(struct ufs_file *file);
void ufs_file_set_fallocate(struct ufs_file *file, uintptr_t mapping);
void ufs_file_set_counters(struct ufs_file *file, struct ufs_counter *user, struct ufs_counter *mount);
int64_t ufs_file_charged(struct ufs_file *file);
void ufs_file_set_charged(struct ufs_file *file, int64_t charged);
int ufs_fast_open(struct ufs_fast *fast, uint64_t fh, uint64_t ino, int writable);
void ufs_fast_release(struct ufs_fast *fast, uint64_t fh);

/* --- the handlers, in Python (ufsgmem/fuse/lowlevel.py) --- */
extern "Python" void py_lookup(fuse_req_t, uint64_t parent, const char *name);
extern "Python" void py_forget(fuse_req_t, uint64_t ino, uint64_t nlookup);
extern "Python" void py_getattr(fuse_req_t, uint64_t ino, int has_fh, uint64_t fh);
extern "Python" void py_setattr(fuse_req_t, uint64_t ino, int to_set, int64_t size, int has_fh, uint64_t fh);
extern "Python" void py_open(fuse_req_t, uint64_t ino, int flags, struct fuse_file_info *fi);
extern "Python" void py_opendir(fuse_req_t, uint64_t ino, struct fuse_file_info *fi);
extern "Python" void py_read(fuse_req_t, uint64_t ino, size_t size, int64_t off, uint64_t fh,
                             uint64_t lock_owner);
extern "Python" void py_write(fuse_req_t, uint64_t ino, const char *buf, size_t size, int64_t off,
                              uint64_t fh, int writepage);
extern "Python" void py_release(fuse_req_t, uint64_t ino, uint64_t fh);
extern "Python" void py_fsync(fuse_req_t, uint64_t ino, int datasync, uint64_t fh);
extern "Python" void py_readdir(fuse_req_t, uint64_t ino, size_t size, int64_t off, uint64_t fh);
extern "Python" void py_statfs(fuse_req_t, uint64_t ino);
extern "Python" void py_getxattr(fuse_req_t, uint64_t ino, const char *name, size_t size);
extern "Python" void py_setxattr(fuse_req_t, uint64_t ino, const char *name);
extern "Python" void py_removexattr(fuse_req_t, uint64_t ino, const char *name);
extern "Python" void py_ioctl(fuse_req_t, uint64_t ino, unsigned int cmd, uint64_t fh, unsigned int flags,
                              const void *in_buf, size_t in_bufsz, size_t out_bufsz);
extern "Python" void py_fallocate(fuse_req_t, uint64_t ino, int mode, int64_t offset, int64_t length,
                                  uint64_t fh);
"""

SOURCE = r"""
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/uio.h>
#include <unistd.h>
#include "counter.h"
#include "fastpath.h"

static void py_lookup(fuse_req_t, uint64_t, const char *);
static void py_forget(fuse_req_t, uint64_t, uint64_t);
static void py_getattr(fuse_req_t, uint64_t, int, uint64_t);
static void py_setattr(fuse_req_t, uint64_t, int, int64_t, int, uint64_t);
static void py_open(fuse_req_t, uint64_t, int, struct fuse_file_info *);
static void py_opendir(fuse_req_t, uint64_t, struct fuse_file_info *);
static void py_read(fuse_req_t, uint64_t, size_t, int64_t, uint64_t, uint64_t);
static void py_write(fuse_req_t, uint64_t, const char *, size_t, int64_t, uint64_t, int);
static void py_release(fuse_req_t, uint64_t, uint64_t);
static void py_fsync(fuse_req_t, uint64_t, int, uint64_t);
static void py_readdir(fuse_req_t, uint64_t, size_t, int64_t, uint64_t);
static void py_statfs(fuse_req_t, uint64_t);
static void py_getxattr(fuse_req_t, uint64_t, const char *, size_t);
static void py_setxattr(fuse_req_t, uint64_t, const char *);
static void py_removexattr(fuse_req_t, uint64_t, const char *);
static void py_ioctl(fuse_req_t, uint64_t, unsigned int, uint64_t, unsigned int, const void *, size_t, size_t);
static void py_fallocate(fuse_req_t, uint64_t, int, int64_t, int64_t, uint64_t);

/* ---- callbacks: flatten, then call Python ---- */
static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) { py_lookup(req, parent, name); }

static void ll_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    py_forget(req, ino, nlookup);
    fuse_reply_none(req);
}

static void ll_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    for (size_t i = 0; i < count; i++)
        py_forget(req, forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    py_getattr(req, ino, fi != NULL, fi ? fi->fh : 0);
}

static void ll_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    py_setattr(req, ino, to_set, (int64_t)attr->st_size, fi != NULL, fi ? fi->fh : 0);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { py_open(req, ino, fi->flags, fi); }
static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { py_opendir(req, ino, fi); }

static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    if (ufs_fast_read(fuse_req_userdata(req), req, ino, size, off, fi->fh, fi->lock_owner))
        return;
    py_read(req, ino, size, off, fi->fh, fi->lock_owner);
}

static void ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    if (ufs_fast_write(fuse_req_userdata(req), req, ino, buf, size, off, fi->fh, fi->writepage))
        return;
    py_write(req, ino, buf, size, off, fi->fh, fi->writepage);
}

static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }
static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { py_release(req, ino, fi->fh); }
static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }

static void ll_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    py_fsync(req, ino, datasync, fi->fh);
}

static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi)
{
    py_readdir(req, ino, size, off, fi->fh);
}

static void ll_statfs(fuse_req_t req, fuse_ino_t ino) { py_statfs(req, ino); }

static void ll_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    py_getxattr(req, ino, name, size);
}

static void ll_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                        int flags)
{
    py_setxattr(req, ino, name);
}

static void ll_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    if (size == 0)
        fuse_reply_xattr(req, 0);  /* no attributes: the list is empty */
    else
        fuse_reply_buf(req, NULL, 0);
}

static void ll_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) { py_removexattr(req, ino, name); }

static void ll_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                     unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    if (ufs_fast_ioctl(fuse_req_userdata(req), req, ino, cmd, fi->fh, flags, in_buf, in_bufsz, out_bufsz))
        return;
    py_ioctl(req, ino, cmd, fi->fh, flags, in_buf, in_bufsz, out_bufsz);
}

static void ll_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                         struct fuse_file_info *fi)
{
    if (ufs_fast_fallocate(fuse_req_userdata(req), req, ino, mode, offset, length, fi->fh))
        return;
    py_fallocate(req, ino, mode, offset, length, fi->fh);
}

/* ---- INIT: what we ask of the kernel ---- */
static void ll_init(void *userdata, struct fuse_conn_info *conn)
{
    /* Dirty pages must come back as FUSE WRITE when a range is revoked, and write(2) must reach us before
       it touches the page cache: no writeback cache. Attributes never change behind the kernel's back, so
       there is nothing for auto_inval_data to do but drop whole page caches on a GETATTR. */
    conn->want &= ~(FUSE_CAP_WRITEBACK_CACHE | FUSE_CAP_AUTO_INVAL_DATA);
}

static const struct fuse_lowlevel_ops ufs_ops = {
    .init = ll_init,
    .lookup = ll_lookup,
    .forget = ll_forget,
    .forget_multi = ll_forget_multi,
    .getattr = ll_getattr,
    .setattr = ll_setattr,
    .open = ll_open,
    .read = ll_read,
    .write = ll_write,
    .flush = ll_flush,
    .release = ll_release,
    .fsync = ll_fsync,
    .opendir = ll_opendir,
    .readdir = ll_readdir,
    .releasedir = ll_releasedir,
    .statfs = ll_statfs,
    .setxattr = ll_setxattr,
    .getxattr = ll_getxattr,
    .listxattr = ll_listxattr,
    .removexattr = ll_removexattr,
    .ioctl = ll_ioctl,
    .fallocate = ll_fallocate,
};

struct fuse_session *ufs_session_new(int argc, char **argv, void *userdata)
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_session *se = fuse_session_new(&args, &ufs_ops, sizeof(ufs_ops), userdata);
    fuse_opt_free_args(&args);
    return se;
}

/* ---- custom I/O: plain read/writev, and the INIT reply gets FUSE_DIRECT_IO_ALLOW_MMAP ---- */
#define UFS_FUSE_INIT_EXT (1u << 30)
#define UFS_DIRECT_IO_ALLOW_MMAP_FLAGS2 (1u << (36 - 32))
#define UFS_INIT_OUT_SIZE 64          /* struct fuse_init_out as libfuse 3.14 sends it */
#define UFS_INIT_OUT_FLAGS 12         /* offsetof(struct fuse_init_out, flags) */
#define UFS_INIT_OUT_FLAGS2 32        /* offsetof(struct fuse_init_out, flags2) */
/* Every worker thread's reply passes here. Atomic, not volatile: the first reply happens before any other
   only through the kernel (no request comes before INIT is answered), an ordering ThreadSanitizer cannot
   see; a plain int read and written by many threads is a data race in C, which it reported. */
static int init_replied;

static ssize_t ufs_read(int fd, void *buf, size_t len, void *userdata) { return read(fd, buf, len); }

static ssize_t ufs_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    if (!__atomic_load_n(&init_replied, __ATOMIC_RELAXED) && count == 2 && iov[1].iov_len == UFS_INIT_OUT_SIZE) {
        /* The first reply of a session answers INIT (the kernel sends nothing else before it). */
        char *out = iov[1].iov_base;
        uint32_t flags, flags2;
        memcpy(&flags, out + UFS_INIT_OUT_FLAGS, 4);
        memcpy(&flags2, out + UFS_INIT_OUT_FLAGS2, 4);
        flags |= UFS_FUSE_INIT_EXT;
        flags2 |= UFS_DIRECT_IO_ALLOW_MMAP_FLAGS2;
        memcpy(out + UFS_INIT_OUT_FLAGS, &flags, 4);
        memcpy(out + UFS_INIT_OUT_FLAGS2, &flags2, 4);
    }
    __atomic_store_n(&init_replied, 1, __ATOMIC_RELAXED);
    return writev(fd, iov, count);
}

static const struct fuse_custom_io ufs_io = { .writev = ufs_writev, .read = ufs_read };

int ufs_session_custom_io(struct fuse_session *se)
{
    return fuse_session_custom_io(se, &ufs_io, fuse_session_fd(se));
}

int ufs_session_loop(struct fuse_session *se, unsigned max_threads)
{
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (config == NULL)
        return -ENOMEM;
    fuse_loop_cfg_set_clone_fd(config, 0);
    fuse_loop_cfg_set_max_threads(config, max_threads);
    int res = fuse_session_loop_mt(se, config);
    fuse_loop_cfg_destroy(config);
    return res;
}

/* ---- replies from plain numbers ---- */
int ufs_req_ctx(fuse_req_t req, uint32_t *uid, uint32_t *gid, int32_t *pid)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    *uid = ctx->uid;
    *gid = ctx->gid;
    *pid = ctx->pid;
    return 0;
}

static void fill_stat(struct stat *st, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid, uint32_t gid,
                      int64_t size, int64_t blksize, int64_t time_ns)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = mode;
    st->st_nlink = nlink;
    st->st_uid = uid;
    st->st_gid = gid;
    st->st_size = size;
    st->st_blksize = blksize;
    st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = time_ns / 1000000000;
    st->st_atim.tv_nsec = st->st_mtim.tv_nsec = st->st_ctim.tv_nsec = time_ns % 1000000000;
}

int ufs_reply_attr(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid, uint32_t gid,
                   int64_t size, int64_t blksize, int64_t time_ns, double timeout)
{
    struct stat st;
    fill_stat(&st, ino, mode, nlink, uid, gid, size, blksize, time_ns);
    return fuse_reply_attr(req, &st, timeout);
}

int ufs_reply_entry(fuse_req_t req, uint64_t ino, uint32_t mode, uint32_t nlink, uint32_t uid, uint32_t gid,
                    int64_t size, int64_t blksize, int64_t time_ns, double attr_timeout, double entry_timeout)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    e.ino = ino;
    e.generation = 1;
    fill_stat(&e.attr, ino, mode, nlink, uid, gid, size, blksize, time_ns);
    e.attr_timeout = attr_timeout;
    e.entry_timeout = entry_timeout;
    return fuse_reply_entry(req, &e);
}

int ufs_reply_open(fuse_req_t req, struct fuse_file_info *fi, uint64_t fh, int direct_io, int keep_cache,
                   int nonseekable, int noflush)
{
    fi->fh = fh;
    fi->direct_io = direct_io != 0;
    fi->keep_cache = keep_cache != 0;
    fi->nonseekable = nonseekable != 0;
    fi->noflush = noflush != 0;
    return fuse_reply_open(req, fi);
}

int ufs_reply_statfs(fuse_req_t req, unsigned long bsize, unsigned long namemax)
{
    struct statvfs st;
    memset(&st, 0, sizeof(st));
    st.f_bsize = st.f_frsize = bsize;
    st.f_namemax = namemax;
    return fuse_reply_statfs(req, &st);
}

size_t ufs_add_direntry(fuse_req_t req, char *buf, size_t bufsize, const char *name, uint64_t ino,
                        uint32_t mode, int64_t off)
{
    struct stat st;
    memset(&st, 0, sizeof(st));
    st.st_ino = ino;
    st.st_mode = mode;
    return fuse_add_direntry(req, buf, bufsize, name, &st, off);
}
"""


def sanitize_flags(value: str | None) -> list[str]:
    """Compile and link flags for ``UFSGMEM_SANITIZE=value`` (a comma list of ``-fsanitize`` names).

    ``-fno-omit-frame-pointer -g`` give a report its stack with file and line. With ``undefined``, the
    first finding stops the process (``-fno-sanitize-recover``): undefined behaviour that only prints
    would let a test pass with it, and the sanitizer script fails a run on what stops a process.
    """
    names = [name.strip() for name in (value or "").split(",") if name.strip()]
    if not names:
        return []
    flags = [f"-fsanitize={','.join(names)}", "-fno-omit-frame-pointer", "-g"]
    if "undefined" in names:
        flags.append("-fno-sanitize-recover=undefined")
    return flags


SANITIZE = sanitize_flags(os.environ.get("UFSGMEM_SANITIZE"))


def _pkg_config(*args: str) -> list[str]:
    return subprocess.run(["pkg-config", *args, "fuse3"], check=True, capture_output=True,
                          text=True).stdout.split()


#: The hot path's sources, and the compiled core's (the same files as ``ufsgmem.core._core``: a struct
#: made there is used here by address).
SOURCES = [os.path.join(HERE, name) for name in ("fastpath.c", "counter.c", "idmap.c")] + \
    [os.path.join(CORE, name) for name in ("runmap.c", "gmem.c")]


def _path(path: str) -> str:
    """Relative to the working directory when inside it (a wheel build refuses absolute source paths),
    absolute otherwise (``ffibuilder.compile(tmpdir=...)`` run from elsewhere): as ``core/_build.py``."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "ufsgmem.fuse._lowlevel", SOURCE,
    sources=[_path(p) for p in SOURCES],
    include_dirs=[HERE, CORE] + [flag[2:] for flag in _pkg_config("--cflags-only-I")],
    library_dirs=[flag[2:] for flag in _pkg_config("--libs-only-L")],
    libraries=[flag[2:] for flag in _pkg_config("--libs-only-l")],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter", "-Wno-unused-function", *SANITIZE],
    extra_link_args=SANITIZE,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
