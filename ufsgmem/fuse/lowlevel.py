"""libfuse3's low-level API, as much of it as ufsgmem uses: a session, its multi-threaded loop, replies,
and ranged invalidation.

Requests arrive on libfuse's worker threads (``fuse_session_loop_mt``). mem's common page fills,
write-backs and conversions are served in C there (``fastpath.c``, the session's ``fast``); every other
request is a call of a ``py_*`` function below (``extern "Python"``, entered with the GIL taken by cffi). Every one of them asks
the session's *handler* object (``ops.py``) for an answer and sends exactly one reply. This is the only
place that turns an exception into a FUSE error reply: ``OSError`` becomes its errno; anything else is a
bug, logged with its traceback and answered with EIO. Handlers therefore return values and never reply
themselves, so a request can never be answered twice.

Threads: libfuse starts a new worker whenever the last idle one takes a request, but only up to
``MAX_THREADS``, and a revocation waits for dirty pages to come back as WRITE requests that another
worker must serve. So a handler never waits long itself: work that may wait (for a file's lock, a
revocation, a preallocation) is returned as a :class:`Deferred`, which at most ``INLINE_SLOTS`` workers
run themselves at a time (no thread hop on the common path) and the executor (``executor.py``) runs
otherwise. Its value becomes the reply here, as a direct answer does, from whichever thread ran it
(libfuse allows a reply from any thread; the request stays valid until answered). However many requests
wait, ``MAX_THREADS - INLINE_SLOTS`` workers are left to serve everything else. cffi releases the GIL
around every call into libfuse, so a blocked notification holds no Python lock. Handlers must still never
block waiting for a request that only their own thread could serve; ``transitions.py`` points to the
three cases.

FUSE_INTERRUPT is not acted on: accepted work runs to its end (docs/architecture.md says why). At the
end (``close``), queued work is answered ENOTCONN without running, running work gets ``DRAIN_SECONDS``
before the connection is aborted, and the executor is joined before the session is freed.

Signals: SIGTERM, SIGINT and SIGHUP end the loop through libfuse's own handlers
(``fuse_set_signal_handlers``), which run in the thread that entered the loop; libfuse's workers block
those signals. Python-level handlers cannot work here, since the main thread sits in C.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Callable, Hashable

from ._lowlevel import ffi, lib
from .abort import abort_connection, connection_of, detach
from .executor import LOOP_SIGNALS, Executor
from .fastpath import FastPath

log = logging.getLogger("ufsgmem.fuse")

#: libfuse starts workers on demand up to this many; each holds a receive buffer of max_write (1 MiB).
MAX_THREADS = 32
#: At most this many of those workers run a :class:`Deferred`'s work themselves (no thread hop: the fast
#: path of a lone conversion); beyond that it goes to the executor. Fewer than MAX_THREADS, so however
#: many requests wait, MAX_THREADS - INLINE_SLOTS workers are left for write-backs and everything else.
#: The compiled path's conversions take the same slots (one count in C, ``fastpath.h``).
INLINE_SLOTS = lib.UFS_INLINE_SLOTS
#: The executor's threads (``executor.py``): how many files' deferred work runs side by side.
EXECUTOR_THREADS = 32
#: At the end of a session, how long requests still running get before the connection is aborted.
DRAIN_SECONDS = 1.0
#: How often the loop's watcher looks whether the loop has been told to end.
WATCH_SECONDS = 0.5

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


class Deferred:
    """A handler's answer for work that may wait long (a file lock, a revocation, a preallocation).

    ``work()`` returns, or raises, what the handler would have; that becomes the reply exactly as a direct
    answer does. It runs on the worker that received the request if one of ``INLINE_SLOTS`` is free,
    otherwise on the session's executor, after the earlier work of the same ``key`` (a file): either way
    libfuse keeps workers free to serve the write-backs such work waits for. (A plain class: it is made
    for every conversion, and a frozen dataclass costs twice as much to make.)
    """

    __slots__ = ("work", "key")

    def __init__(self, work: Callable[[], object], key: Hashable | None = None):
        self.work, self.key = work, key


@dataclass(frozen=True)
class IoctlReply:
    """``result`` 0 or -errno; ``out`` the bytes copied back to the caller's argument (may be empty)."""

    result: int
    out: bytes = b""


class Session:
    """One FUSE connection: ``mount``, ``loop`` (blocks until a signal or unmount), ``close``.

    ``handler`` answers requests (see ``ops.Operations``); ``uid``/``gid``/``time_ns`` are the owner and
    times every inode shows; ``on_request``, if set, is called as each request arrives, before its
    handler (``latency.LatencyHold.touch``; not for the requests C serves: the hold is told of those through
    ``fast``, ``LatencyHold.attach``). ``hot_path``: ``compiled`` lets C serve mem's common requests
    (``fastpath.c``), ``python`` serves all of them here.
    """

    def __init__(self, handler, options: list[str], *, uid: int, gid: int, time_ns: int, on_request=None,
                 hot_path: str = "compiled"):
        self.handler = handler
        self.on_request = on_request
        self.uid, self.gid, self.time_ns = uid, gid, time_ns
        self._handle = ffi.new_handle(self)  # kept alive as long as the session
        self._fast = lib.ufs_fast_new(self._handle)  # the request's userdata: C's part, pointing back here
        if self._fast == ffi.NULL:
            raise MemoryError("cannot allocate the session's compiled path")
        self.fast = FastPath(self._fast, hot_path)
        argv = [ffi.new("char[]", a.encode()) for a in ["ufsgmem", "-o", ",".join(options)]]
        self._argv = argv
        self._se = lib.ufs_session_new(len(argv), ffi.new("char *[]", argv), self._fast)
        if self._se == ffi.NULL:
            lib.ufs_fast_free(self._fast)
            self._fast = ffi.NULL
            raise OSError(errno.EINVAL, f"libfuse refused the session options {options}")
        lib.ufs_fast_set_session(self._fast, self._se)
        self.mounted = False
        self.mountpoint: str | None = None
        self.connection: int | None = None  # fusectl's number for it, to abort it at the end if need be
        self.aborted = False
        self.executor = Executor(EXECUTOR_THREADS)
        self._reply_lock = threading.Lock()  # a late reply and the end of the session exclude each other
        self._replying = True

    @classmethod
    def serving(cls, make_handler, options: list[str], **kwargs) -> "Session":
        """A session whose handler is ``make_handler(session)``: for a handler that sends notifications on
        its own session (revocations, a destroyed name's dentry). Nothing can ask the handler anything
        before it is in place: the session is not mounted yet."""
        session = cls(None, options, **kwargs)
        try:
            session.handler = make_handler(session)
        except BaseException:
            session.close()
            raise
        return session

    def mount(self, mountpoint: str) -> None:
        """Mount at ``mountpoint`` (an absolute path without symlinks)."""
        if lib.fuse_session_mount(self._se, mountpoint.encode()) != 0:
            raise OSError(errno.EIO, f"cannot mount {mountpoint} (libfuse's reason is on stderr/in the log)")
        self.mounted = True
        self.mountpoint, self.connection = mountpoint, connection_of(mountpoint)
        if lib.ufs_session_custom_io(self._se) != 0:
            raise OSError(errno.EIO, "cannot install the session's I/O functions")

    def loop(self, max_threads: int = MAX_THREADS) -> int:
        """Serve until SIGTERM/SIGINT/SIGHUP or until the connection ends; libfuse's result."""
        if lib.fuse_set_signal_handlers(self._se) != 0:
            raise OSError(errno.EIO, "cannot install libfuse's signal handlers")
        returned = threading.Event()
        watch = threading.Thread(target=self._watch_end, args=(returned,), name="ufsgmem-end", daemon=True)
        watch.start()
        try:
            return lib.ufs_session_loop(self._se, max_threads)
        finally:
            returned.set()
            lib.fuse_remove_signal_handlers(self._se)
            watch.join()

    def _watch_end(self, returned: threading.Event) -> None:
        """Once the loop is told to end, give it ``DRAIN_SECONDS``; then abort the connection. libfuse
        waits for every worker before its loop returns, and a worker whose request waits for a write-back
        (a revocation run inline) would wait forever: the other workers have stopped reading."""
        signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)  # they belong to the loop's thread
        while not returned.wait(WATCH_SECONDS):
            if lib.fuse_session_exited(self._se):
                if not returned.wait(DRAIN_SECONDS):
                    log.warning("requests still running as the loop ends: aborting the connection")
                    self._abort()
                return

    def _abort(self) -> None:
        """Abort this session's connection through fusectl, if the mount is still ours."""
        ours = self.connection is not None and connection_of(self.mountpoint) == self.connection
        if ours and abort_connection(self.connection):
            self.aborted = True
        else:
            log.warning("cannot abort FUSE connection %s; unmounting instead", self.connection)

    @property
    def fd(self) -> int:
        """The connection's ``/dev/fuse`` descriptor (libfuse's; it stays open until :meth:`close`)."""
        return lib.fuse_session_fd(self._se)

    def exit(self) -> None:
        lib.fuse_session_exit(self._se)

    # --- deferred work -------------------------------------------------------------------------------
    def inline_slot(self):
        """A token if fewer than ``INLINE_SLOTS`` workers (Python's and C's conversions together) run
        deferred work now (give it back with ``inline_done``), else None: the work goes to the executor."""
        return True if lib.ufs_fast_inline_take(self._fast) else None

    def inline_done(self, token) -> None:
        lib.ufs_fast_inline_give(self._fast)

    def defer(self, key: Hashable | None, run: Callable[[], None], cancel: Callable[[], None]) -> None:
        """``run()`` on the executor after the earlier work of ``key``; ``cancel()`` instead if the session
        ends before its turn."""
        if not self.executor.submit(key, run, cancel):
            cancel()

    def reply_late(self, send: Callable[[], object]) -> None:
        """Send a reply from the executor, unless the session has ended (the kernel has failed the
        request then; the descriptor it would go to may be closed or even reused)."""
        with self._reply_lock:
            if self._replying:
                send()

    def close(self) -> None:
        """Unmount (lazily, as root) and free the session. Call once the loop has returned.

        Deferred work first: what is queued is answered ENOTCONN without running; what runs gets
        ``DRAIN_SECONDS`` to finish, and then the connection is aborted, since it may wait for write-backs
        no worker serves any more (its reply is dropped: the abort fails the request). Only when no
        executor thread can touch the session any more is it freed.
        """
        if self._se == ffi.NULL:
            return
        self.executor.stop()
        drained = self.executor.join(DRAIN_SECONDS)
        with self._reply_lock:
            self._replying = False
        if not drained:
            log.warning("deferred requests still running at the end of the session: aborting the connection")
            self._abort()
        if self.mounted:  # closes /dev/fuse: the kernel fails whatever still waits for an answer
            lib.fuse_session_unmount(self._se)
            self.mounted = False
            if self.aborted and connection_of(self.mountpoint) == self.connection and not detach(self.mountpoint):
                log.warning("cannot unmount %s after aborting its connection", self.mountpoint)
        if not self.executor.join(None if drained else 30.0):
            log.error("deferred requests still running after the connection ended: leaving the session "
                      "allocated rather than freeing it under them")
            self._se = ffi.NULL
            return
        lib.fuse_session_destroy(self._se)
        self._se = ffi.NULL
        self.fast.disable()
        # The files still registered lose the table's reference; each FastFile keeps its own.
        lib.ufs_fast_free(self._fast)
        self._fast = self.fast.ptr = ffi.NULL

    # --- notifications: block until the kernel is done (where they may be sent: docs/architecture.md) ---
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
def _session(req) -> Session:
    return ffi.from_handle(lib.ufs_fast_py(lib.fuse_req_userdata(req)))


def _serve(req, name: str, args: tuple, reply) -> None:
    """Answer ``req`` with ``reply(handler.<name>(*args))``, or with the errno of the OSError it raises
    (a :class:`Deferred` answer is worked out first, here or on the executor: ``_answer``)."""
    session = _session(req)
    if session.on_request is not None:
        try:
            session.on_request()
        except BaseException:  # noqa: BLE001 - a bug in the hook must not cost the request its reply
            log.exception("on_request")
    _answer(req, session, lambda: getattr(session.handler, name)(*args), reply, (name, args))


def _answer(req, session: Session, compute, reply, what, late: bool = False) -> None:
    """The one place where a value becomes a reply and an exception an errno. A :class:`Deferred` value is
    worked out here and now if an inline slot is free, else handed to the executor, which calls this again
    with ``late``: the reply then goes through ``Session.reply_late`` (dropped once the session closes)."""
    err = 0
    try:
        value = compute()
        if value.__class__ is Deferred:
            if late:
                raise TypeError("a Deferred's work returned another Deferred")
            token = session.inline_slot()
            if token is None:
                session.defer(value.key, lambda: _answer(req, session, value.work, reply, what, late=True),
                              lambda: session.reply_late(lambda: lib.fuse_reply_err(req, errno.ENOTCONN)))
                return
            try:
                value = value.work()
            finally:
                session.inline_done(token)
    except OSError as exc:
        err = exc.errno or errno.EIO
    except BaseException:  # noqa: BLE001 - a bug: keep serving, say so in the log
        log.exception("internal error in %s%r", *what)
        err = errno.EIO
    if late:
        session.reply_late(lambda: lib.fuse_reply_err(req, err) if err else reply(value))
    elif err:
        lib.fuse_reply_err(req, err)
    else:
        reply(value)


def _owner(s: Session, attr: Attr) -> tuple[int, int]:
    return attr.owner if attr.owner is not None else (s.uid, s.gid)


def _reply_attr(req, attr: Attr) -> None:
    s = _session(req)
    uid, gid = _owner(s, attr)
    lib.ufs_reply_attr(req, attr.ino, attr.mode, attr.nlink, uid, gid, attr.size, attr.blksize, s.time_ns,
                       attr.timeout)


@ffi.def_extern()
def py_lookup(req, parent, name):
    def reply(attr: Attr) -> None:
        s = _session(req)
        uid, gid = _owner(s, attr)
        lib.ufs_reply_entry(req, attr.ino, attr.mode, attr.nlink, uid, gid, attr.size, attr.blksize,
                            s.time_ns, attr.timeout, attr.timeout)
    _serve(req, "lookup", (parent, ffi.string(name).decode("utf-8", "surrogateescape")), reply)


@ffi.def_extern()
def py_forget(req, ino, nlookup):
    try:  # the C side replies (FORGET's reply is none), after every forget of a batch
        _session(req).handler.forget(ino, nlookup)
    except BaseException:  # noqa: BLE001 - FORGET has no reply to carry an error
        log.exception("forget(%d, %d)", ino, nlookup)


@ffi.def_extern()
def py_getattr(req, ino, has_fh, fh):
    _serve(req, "getattr", (ino, fh if has_fh else None), lambda attr: _reply_attr(req, attr))


@ffi.def_extern()
def py_setattr(req, ino, to_set, size, has_fh, fh):
    _serve(req, "setattr", (ino, to_set, size, fh if has_fh else None), lambda attr: _reply_attr(req, attr))


def _open_reply(req, fi):
    return lambda opened: lib.ufs_reply_open(req, fi, opened.fh, opened.direct_io, opened.keep_cache,
                                             opened.nonseekable, opened.noflush)


@ffi.def_extern()
def py_open(req, ino, flags, fi):
    _serve(req, "open", (ino, flags, caller(req)), _open_reply(req, fi))


@ffi.def_extern()
def py_opendir(req, ino, fi):
    _serve(req, "opendir", (ino,), _open_reply(req, fi))


@ffi.def_extern()
def py_read(req, ino, size, off, fh, lock_owner):
    _serve(req, "read", (ino, fh, off, size, lock_owner != 0),
           lambda data: lib.fuse_reply_buf(req, ffi.from_buffer(data), len(data)))


@ffi.def_extern()
def py_write(req, ino, buf, size, off, fh, writepage):
    # The buffer is libfuse's and reused once this returns: a handler that defers copies what it keeps.
    _serve(req, "write", (ino, fh, off, ffi.buffer(buf, size), bool(writepage)),
           lambda count: lib.fuse_reply_write(req, count))


def _ok(req):
    return lambda _: lib.fuse_reply_err(req, 0)


@ffi.def_extern()
def py_release(req, ino, fh):
    _serve(req, "release", (ino, fh), _ok(req))


@ffi.def_extern()
def py_fsync(req, ino, datasync, fh):
    _serve(req, "fsync", (ino, fh, bool(datasync)), _ok(req))


@ffi.def_extern()
def py_readdir(req, ino, size, off, fh):
    def reply(entries) -> None:
        buf = ffi.new("char[]", size)
        used = 0
        for name, child, mode, next_off in entries:
            raw = os.fsencode(name)
            need = lib.ufs_add_direntry(req, buf + used, size - used, raw, child, mode, next_off)
            if need > size - used:
                break
            used += need
        lib.fuse_reply_buf(req, buf, used)
    _serve(req, "readdir", (ino, fh, off), reply)


@ffi.def_extern()
def py_statfs(req, ino):
    _serve(req, "statfs", (), lambda st: lib.ufs_reply_statfs(req, *st))


@ffi.def_extern()
def py_getxattr(req, ino, name, size):
    _serve(req, "getxattr", (ino, ffi.string(name)), _ok(req))  # handlers always raise (no xattrs)


@ffi.def_extern()
def py_setxattr(req, ino, name):
    _serve(req, "setxattr", (ino, ffi.string(name)), _ok(req))


@ffi.def_extern()
def py_removexattr(req, ino, name):
    _serve(req, "removexattr", (ino, ffi.string(name)), _ok(req))


@ffi.def_extern()
def py_ioctl(req, ino, cmd, fh, flags, in_buf, in_bufsz, out_bufsz):
    def reply(answer: IoctlReply) -> None:
        if answer.out and len(answer.out) <= out_bufsz:
            lib.fuse_reply_ioctl(req, answer.result, answer.out, len(answer.out))
        elif answer.result < 0:
            lib.fuse_reply_err(req, -answer.result)  # nothing to copy back
        else:
            lib.fuse_reply_ioctl(req, answer.result, ffi.NULL, 0)
    data = bytes(ffi.buffer(in_buf, in_bufsz)) if in_bufsz else b""
    _serve(req, "ioctl", (ino, fh, cmd, flags, data, out_bufsz), reply)


@ffi.def_extern()
def py_fallocate(req, ino, mode, offset, length, fh):
    _serve(req, "fallocate", (ino, fh, mode, offset, length), _ok(req))
