"""libfuse3's low-level API, as much of it as ufsgmem uses: a session, its multi-threaded loop, replies,
and ranged invalidation.

Requests arrive on libfuse's worker threads (``fuse_session_loop_mt``), each one a call of a
``py_*`` function below (``extern "Python"``, entered with the GIL taken by cffi). Every one of them asks
the session's *handler* object (``ops.py``) for an answer and sends exactly one reply. This is the only
place that turns an exception into a FUSE error reply: ``OSError`` becomes its errno; anything else is a
bug, logged with its traceback and answered with EIO. Handlers therefore return values and never reply
themselves, so a request can never be answered twice.

Threads: libfuse starts a new worker whenever the last idle one takes a request (up to
``MAX_THREADS``), so a handler may block (a revocation waiting for dirty pages to come back as WRITE
requests, a hugetlb preallocation) while the others keep serving. cffi releases the GIL around every
call into libfuse, so a blocked notification holds no Python lock. Handlers must still never block
waiting for a request that only their own thread could serve; ``files.py`` names the three cases.

Signals: SIGTERM, SIGINT and SIGHUP end the loop through libfuse's own handlers
(``fuse_set_signal_handlers``), which run in the thread that entered the loop; libfuse's workers block
those signals. Python-level handlers cannot work here, since the main thread sits in C.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from ._lowlevel import ffi, lib

log = logging.getLogger("ufsgmem.fuse")

#: libfuse starts workers on demand up to this many; each holds a receive buffer of max_write (1 MiB).
MAX_THREADS = 32

#: fuse_setattr's to_set bits (fuse_lowlevel.h)
FUSE_SET_ATTR_MODE, FUSE_SET_ATTR_UID, FUSE_SET_ATTR_GID, FUSE_SET_ATTR_SIZE = 1, 2, 4, 8
#: ioctl flag: the caller is a 32-bit process on a 64-bit kernel (fuse_common.h)
FUSE_IOCTL_COMPAT = 1


@dataclass(frozen=True)
class Attr:
    """What ``stat`` shows of an inode, and how long the kernel may cache it."""

    ino: int
    mode: int
    nlink: int = 1
    size: int = 0
    blksize: int = 4096
    timeout: float = 3600.0
    owner: tuple[int, int] | None = None  # (uid, gid); None: the user who mounted


@dataclass(frozen=True)
class Opened:
    """The answer to OPEN/OPENDIR: our handle and how the kernel should treat the file."""

    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    noflush: bool = True


@dataclass(frozen=True)
class IoctlReply:
    """``result`` 0 or -errno; ``out`` the bytes copied back to the caller's argument (may be empty)."""

    result: int
    out: bytes = b""


class Session:
    """One FUSE connection: ``mount``, ``loop`` (blocks until a signal or unmount), ``close``.

    ``handler`` answers requests (see ``ops.Operations``); ``uid``/``gid``/``time_ns`` are the owner and
    times every inode shows; ``on_request``, if set, is called as each request arrives, before its
    handler (``latency.LatencyHold.touch``).
    """

    def __init__(self, handler, options: list[str], *, uid: int, gid: int, time_ns: int, on_request=None):
        self.handler = handler
        self.on_request = on_request
        self.uid, self.gid, self.time_ns = uid, gid, time_ns
        self._handle = ffi.new_handle(self)  # kept alive as long as the session
        argv = [ffi.new("char[]", a.encode()) for a in ["ufsgmem", "-o", ",".join(options)]]
        self._argv = argv
        self._se = lib.ufs_session_new(len(argv), ffi.new("char *[]", argv), self._handle)
        if self._se == ffi.NULL:
            raise OSError(errno.EINVAL, f"libfuse refused the session options {options}")
        self.mounted = False

    def mount(self, mountpoint: str) -> None:
        if lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
            raise OSError(errno.EIO, f"cannot mount {mountpoint} (libfuse's reason is on stderr/in the log)")
        self.mounted = True
        if lib.ufs_session_custom_io(self._se) != 0:
            raise OSError(errno.EIO, "cannot install the session's I/O functions")

    def loop(self, max_threads: int = MAX_THREADS) -> int:
        """Serve until SIGTERM/SIGINT/SIGHUP or until the connection ends; libfuse's result."""
        if lib.fuse_set_signal_handlers(self._se) != 0:
            raise OSError(errno.EIO, "cannot install libfuse's signal handlers")
        try:
            return lib.ufs_session_loop(self._se, max_threads)
        finally:
            lib.fuse_remove_signal_handlers(self._se)

    def exit(self) -> None:
        lib.fuse_session_exit(self._se)

    def close(self) -> None:
        """Unmount (lazily, as root) and free the session. Call once the loop has returned."""
        if self._se == ffi.NULL:
            return
        if self.mounted:
            lib.fuse_session_unmount(self._se)
            self.mounted = False
        lib.fuse_session_destroy(self._se)
        self._se = ffi.NULL

    # --- notifications: block until the kernel is done (never from a READ or write-back handler of the
    # --- same pages: the kernel waits for those pages' locks, which the request itself holds) ---------
    def inval_inode(self, ino: int, offset: int, length: int) -> bool:
        """Unmap ``[offset, offset + length)`` of ``ino`` from every process and drop it from the page cache,
        writing dirty pages back first (as WRITE requests other workers serve). False if the kernel has
        no such inode cached (nothing can be mapped)."""
        err = lib.fuse_lowlevel_notify_inval_inode(self._se, ino, offset, length)
        if err == -errno.ENOENT:
            return False
        if err < 0:
            raise OSError(-err, f"FUSE_NOTIFY_INVAL_INODE {ino} [{offset:#x}, +{length:#x}): {os.strerror(-err)}")
        return True

    def inval_entry(self, parent: int, name: str) -> None:
        raw = os.fsencode(name)
        err = lib.fuse_lowlevel_notify_inval_entry(self._se, parent, raw, len(raw))
        if err < 0 and err != -errno.ENOENT:  # ENOENT: not cached, nothing to drop
            raise OSError(-err, f"FUSE_NOTIFY_INVAL_ENTRY {name!r}: {os.strerror(-err)}")


def libfuse_version() -> str:
    """The libfuse this module was built against and runs with (e.g. ``3.14.0``)."""
    return ffi.string(lib.fuse_pkgversion()).decode()


def caller(req) -> tuple[int, int, int]:
    """``(uid, gid, pid)`` of the process that sent ``req`` (pid 0 for write-back)."""
    uid, gid, pid = ffi.new("uint32_t *"), ffi.new("uint32_t *"), ffi.new("int32_t *")
    lib.ufs_req_ctx(req, uid, gid, pid)
    return uid[0], gid[0], pid[0]


# --- dispatch: one function per request, one reply each --------------------------------------------------
_FAILED = object()


def _session(req) -> Session:
    return ffi.from_handle(lib.fuse_req_userdata(req))


def _call(req, name: str, *args):
    """``handler.<name>(*args)``; on an exception, reply with its errno and return ``_FAILED``."""
    try:
        session = _session(req)
        if session.on_request is not None:
            session.on_request()
        return getattr(session.handler, name)(*args)
    except OSError as exc:
        lib.fuse_reply_err(req, exc.errno or errno.EIO)
    except BaseException:  # noqa: BLE001 - a bug: keep serving, say so in the log
        log.exception("internal error in %s%r", name, args)
        lib.fuse_reply_err(req, errno.EIO)
    return _FAILED


def _owner(s: Session, attr: Attr) -> tuple[int, int]:
    return attr.owner if attr.owner is not None else (s.uid, s.gid)


def _reply_attr(req, attr: Attr) -> None:
    s = _session(req)
    uid, gid = _owner(s, attr)
    lib.ufs_reply_attr(req, attr.ino, attr.mode, attr.nlink, uid, gid, attr.size, attr.blksize, s.time_ns,
                       attr.timeout)


@ffi.def_extern()
def py_lookup(req, parent, name):
    attr = _call(req, "lookup", parent, ffi.string(name).decode("utf-8", "surrogateescape"))
    if attr is not _FAILED:
        s = _session(req)
        uid, gid = _owner(s, attr)
        lib.ufs_reply_entry(req, attr.ino, attr.mode, attr.nlink, uid, gid, attr.size, attr.blksize,
                            s.time_ns, attr.timeout, attr.timeout)


@ffi.def_extern()
def py_forget(req, ino, nlookup):
    try:  # the C side replies (FORGET's reply is none), after every forget of a batch
        _session(req).handler.forget(ino, nlookup)
    except BaseException:  # noqa: BLE001 - FORGET has no reply to carry an error
        log.exception("forget(%d, %d)", ino, nlookup)


@ffi.def_extern()
def py_getattr(req, ino, has_fh, fh):
    attr = _call(req, "getattr", ino, fh if has_fh else None)
    if attr is not _FAILED:
        _reply_attr(req, attr)


@ffi.def_extern()
def py_setattr(req, ino, to_set, size, has_fh, fh):
    attr = _call(req, "setattr", ino, to_set, size, fh if has_fh else None)
    if attr is not _FAILED:
        _reply_attr(req, attr)


def _reply_open(req, fi, opened) -> None:
    if opened is not _FAILED:
        lib.ufs_reply_open(req, fi, opened.fh, opened.direct_io, opened.keep_cache, opened.nonseekable,
                           opened.noflush)


@ffi.def_extern()
def py_open(req, ino, flags, fi):
    _reply_open(req, fi, _call(req, "open", ino, flags, caller(req)))


@ffi.def_extern()
def py_opendir(req, ino, fi):
    _reply_open(req, fi, _call(req, "opendir", ino))


@ffi.def_extern()
def py_read(req, ino, size, off, fh, lock_owner):
    data = _call(req, "read", ino, fh, off, size, lock_owner != 0)
    if data is not _FAILED:
        lib.fuse_reply_buf(req, ffi.from_buffer(data), len(data))


@ffi.def_extern()
def py_write(req, ino, buf, size, off, fh, writepage):
    count = _call(req, "write", ino, fh, off, ffi.buffer(buf, size), bool(writepage))
    if count is not _FAILED:
        lib.fuse_reply_write(req, count)


def _reply_ok(req, result) -> None:
    if result is not _FAILED:
        lib.fuse_reply_err(req, 0)


@ffi.def_extern()
def py_release(req, ino, fh):
    _reply_ok(req, _call(req, "release", ino, fh))


@ffi.def_extern()
def py_fsync(req, ino, datasync, fh):
    _reply_ok(req, _call(req, "fsync", ino, fh, bool(datasync)))


@ffi.def_extern()
def py_readdir(req, ino, size, off, fh):
    entries = _call(req, "readdir", ino, fh, off)
    if entries is _FAILED:
        return
    buf = ffi.new("char[]", size)
    used = 0
    for name, child, mode, next_off in entries:
        raw = os.fsencode(name)
        need = lib.ufs_add_direntry(req, buf + used, size - used, raw, child, mode, next_off)
        if need > size - used:
            break
        used += need
    lib.fuse_reply_buf(req, buf, used)


@ffi.def_extern()
def py_statfs(req, ino):
    st = _call(req, "statfs")
    if st is not _FAILED:
        lib.ufs_reply_statfs(req, *st)


@ffi.def_extern()
def py_getxattr(req, ino, name, size):
    _reply_ok(req, _call(req, "getxattr", ino, ffi.string(name)))  # handlers always raise (no xattrs)


@ffi.def_extern()
def py_setxattr(req, ino, name):
    _reply_ok(req, _call(req, "setxattr", ino, ffi.string(name)))


@ffi.def_extern()
def py_removexattr(req, ino, name):
    _reply_ok(req, _call(req, "removexattr", ino, ffi.string(name)))


@ffi.def_extern()
def py_ioctl(req, ino, cmd, fh, flags, in_buf, in_bufsz, out_bufsz):
    data = bytes(ffi.buffer(in_buf, in_bufsz)) if in_bufsz else b""
    reply = _call(req, "ioctl", ino, fh, cmd, flags, data, out_bufsz)
    if reply is _FAILED:
        return
    if reply.out and len(reply.out) <= out_bufsz:
        lib.fuse_reply_ioctl(req, reply.result, reply.out, len(reply.out))
    elif reply.result < 0:
        lib.fuse_reply_err(req, -reply.result)  # nothing to copy back
    else:
        lib.fuse_reply_ioctl(req, reply.result, ffi.NULL, 0)


@ffi.def_extern()
def py_fallocate(req, ino, mode, offset, length, fh):
    _reply_ok(req, _call(req, "fallocate", ino, fh, mode, offset, length))
