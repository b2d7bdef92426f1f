"""The request handlers: FUSE requests in (from ``lowlevel.py``), :class:`~ufsgmem.fuse.files.Files` calls out.

Thin on purpose: attributes, lookups, handles and dispatch by file kind; the behaviour lives in the
modules ``files.py`` assembles and the core. Handlers return values and raise ``OSError`` with the
kernel's errno; ``lowlevel.py`` turns both into the reply, in one place. Work that may wait for a file's
lock or a revocation (conversions, fallocate, ``ctl`` requests, guest accesses, freeing a file) is
returned as a ``Deferred`` instead, so that it never takes the libfuse worker that a write-back needs
(docs/architecture.md, threads and locks).

Handles: a handle number means one object. Files get numbers from 1 (``Namespace.open``), each recorded
with the inode it was opened on, and every request that carries one names its inode too: a handle used
with another inode is EBADF. Directories keep no state and all share handle 0, so a directory's request
(an ioctl on a directory reaches us) is answered by the directory's kind, as the kernel answers it
(ioctl ENOTTY), never looked up as a file: a directory's handle was once its inode number, and an ioctl
on a directory converted whichever file held that handle number, even another user's.

How ``mem`` keeps guest_memfd's file rules under FUSE (each tested; the deviations left are listed in
``docs/compat.md``):

* **read(2)/write(2) → EINVAL**: ``mem`` is opened with direct I/O, so both reach us as requests we can
  tell from page-cache traffic (``mem.py``), and the kernel lets such a file be mapped shared because
  INIT granted ``FUSE_DIRECT_IO_ALLOW_MMAP`` (``_build.py``). Price: every mmap(2) of a direct-I/O file
  makes the kernel drop that file's whole page cache (``fuse_file_mmap``), unmapping other mappings and
  writing their dirty pages back one by one; contents are kept. Map early, map once (docs/architecture.md).
* **pread/pwrite/lseek → ESPIPE**: ``mem`` is opened nonseekable, which clears FMODE_PREAD/PWRITE; the
  kernel's pseudo-file gives the same errnos.
* **ioctl(KVM_SET_MEMORY_ATTRIBUTES2)** and **fallocate(2)** are served (``Files.ioctl``,
  ``Files.fallocate``); the ``security.capability`` GETXATTR that precedes every fallocate gets ENODATA.
  Never ENOSYS for getxattr, fallocate or fsync: the kernel remembers an ENOSYS for the whole connection.
* **fsync/fdatasync/msync(MS_SYNC) → EINVAL**: guest_memfd has no fsync method.
* **PROT_EXEC → EPERM**: the mount is ``noexec`` like guest_memfd's internal mount (``server.py``).
* **no MMAP flag**: mmap(2) succeeds (FUSE never sees it, and ALLOW_MMAP is per connection), but every
  access is SIGBUS, since each page fill is refused; the kernel says ENODEV at mmap(2) already.
* **MAP_PRIVATE**: FUSE never sees mmap(2) either; its page fills obey the same checks.
* ``keep_cache`` on every open: otherwise each open() would drop the whole file's page cache.
* ``noflush``: close(2) sends no FLUSH (guest_memfd's close writes nothing back either); munmap still
  writes a mapping's dirty pages back.

``private`` (the private view, ``ufsgmem run``) is opened like ``mem``; ``private.py`` says what it serves.

The other files (``ctl``, ``guest``, ``status``, ``snapshot``) are direct I/O too, so with ALLOW_MMAP
they could be mapped: their page-cache fills and write-backs are refused (EIO, SIGBUS in the mapper), so
no mapping ever shows guest memory or sends a request.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from .. import protocol
from .files import Files
from .inodes import FILES, MOUNT_CTL_INO, ROOT_INO, Entry, Handle, Namespace
from .lowlevel import FUSE_IOCTL_COMPAT, FUSE_SET_ATTR_GID, FUSE_SET_ATTR_MODE, FUSE_SET_ATTR_SIZE, \
    FUSE_SET_ATTR_UID, Attr, Deferred, IoctlReply, Opened
from .users import SMALL_RESULT

ATTR_TIMEOUT = 3600.0  # nothing about an inode changes behind the kernel's back except file contents
DIR_MODE = stat.S_IFDIR | 0o700
DIR_FH = 0  # the handle of every open directory; file handles count from 1 (inodes.Namespace)


def _key(handle: Handle):
    """Deferred work of one file runs in order, one request at a time (it would queue for the file's lock
    anyway); requests on the mount's own ctl each go on their own."""
    return None if handle.entry is None else handle.entry.dir_ino


class Operations:
    """``allow_other``: the mount serves other users (``ufsgmem mount --allow-other``, with the kernel's
    ``default_permissions`` checking the modes below). The root directory is then 0755 and ``MOUNTPOINT/ctl``
    0666: any user who can reach the mount may create files, and each file's directory and files belong to
    the user who created it (0700/0600: only that user may map it or send it requests); only that user, the
    user who mounted, or root may destroy it. Without it only the user who mounted can reach the mount."""

    def __init__(self, files: Files, *, allow_other: bool = False, started_ns: int | None = None, on_destroy=None):
        self.files = files
        self.allow_other = allow_other
        self.ns: Namespace = files.ns
        self.started_ns = time.time_ns() if started_ns is None else started_ns
        self.on_destroy = on_destroy  # the server's: invalidate a destroyed name's dentry

    # --- attributes ---------------------------------------------------------------------------------
    def _attr(self, ino: int) -> Attr:
        if ino == ROOT_INO:
            return Attr(ino, stat.S_IFDIR | (0o755 if self.allow_other else 0o700), nlink=2, timeout=ATTR_TIMEOUT)
        if ino == MOUNT_CTL_INO:
            return Attr(ino, stat.S_IFREG | (0o666 if self.allow_other else 0o600), timeout=ATTR_TIMEOUT)
        entry = self._entry(ino)
        kind = entry.kind(ino)
        if kind == "dir":
            return Attr(ino, DIR_MODE, nlink=2, timeout=ATTR_TIMEOUT, owner=entry.owner)
        if kind in ("mem", "private"):
            return Attr(ino, stat.S_IFREG | 0o600, size=entry.gm.size, blksize=entry.gm.folio_size,
                        timeout=ATTR_TIMEOUT, owner=entry.owner)
        mode = stat.S_IFREG | (0o400 if kind in ("status", "snapshot") else 0o600)
        return Attr(ino, mode, size=entry.gm.size if kind == "guest" else 0, timeout=ATTR_TIMEOUT, owner=entry.owner)

    def _entry(self, ino: int) -> Entry:
        entry = self.ns.entry_of(ino)
        if entry is None:
            raise OSError(errno.ENOENT, f"inode {ino} is gone")
        return entry

    def _kind(self, ino: int) -> str:
        if ino == ROOT_INO:
            return "root"
        if ino == MOUNT_CTL_INO:
            return "ctl"
        return self._entry(ino).kind(ino)

    def getattr(self, ino: int, fh: int | None) -> Attr:
        return self._attr(ino)

    def setattr(self, ino: int, to_set: int, size: int, fh: int | None) -> Attr:
        if self._kind(ino) == "ctl" and to_set & FUSE_SET_ATTR_SIZE and size == 0 and not (
                to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)):
            return self._attr(ino)  # `echo REQUEST > ctl`: O_TRUNC of a control file is a no-op
        raise OSError(errno.EINVAL, "guest_memfd's setattr is always EINVAL")

    # --- names --------------------------------------------------------------------------------------
    def lookup(self, parent: int, name: str) -> Attr:
        if parent == ROOT_INO:
            if name == "ctl":
                ino = MOUNT_CTL_INO
            else:
                entry = self.ns.by_name.get(name)
                if entry is None:
                    raise OSError(errno.ENOENT, name)
                ino = entry.dir_ino
        else:
            entry = self._entry(parent)
            if entry.kind(parent) != "dir" or name not in FILES or entry.destroyed:
                raise OSError(errno.ENOENT, name)
            ino = entry.ino(name)
        attr = self._attr(ino)
        self.ns.looked_up(ino)
        return attr

    def forget(self, ino: int, count: int) -> None:
        self.ns.forget(ino, count)

    def opendir(self, ino: int) -> Opened:
        """A directory keeps no state per open, so every one gets handle ``DIR_FH``, a number no file
        handle has: a directory's requests are told apart by their inode, never looked up as a file's."""
        if self._kind(ino) not in ("root", "dir"):
            raise OSError(errno.ENOTDIR, f"inode {ino}")
        return Opened(fh=DIR_FH)

    def _file_handle(self, ino: int, fh: int, request: str, dir_errno: int) -> Handle:
        """The open file ``fh`` of inode ``ino``, for ``request``: ``dir_errno`` when ``ino`` is a directory
        (the kernel's answer for that request on a directory), EBADF when ``fh`` is not open on ``ino``."""
        if self._kind(ino) in ("root", "dir"):
            raise OSError(dir_errno, f"{request} on a directory")
        return self.ns.handle(fh, ino)

    def readdir(self, ino: int, fh: int, offset: int) -> list[tuple[str, int, int, int]]:
        """``(name, ino, mode, next offset)`` from ``offset`` on."""
        kind = self._kind(ino)
        if kind not in ("root", "dir") or fh != DIR_FH:
            raise OSError(errno.ENOTDIR, f"inode {ino} is not an open directory")
        if kind == "root":
            names = [("ctl", MOUNT_CTL_INO)] + [(n, e.dir_ino) for n, e in self.ns.names()]
        else:
            entry = self._entry(ino)
            names = [] if entry.destroyed else [(k, entry.ino(k)) for k in FILES]
        out = []
        for i, (name, ino) in enumerate(names[offset:], offset + 1):
            try:
                out.append((name, ino, self._attr(ino).mode, i))
            except OSError:  # destroyed meanwhile
                continue
        return out

    def statfs(self) -> tuple[int, int]:
        return 4096, protocol.NAME_MAX

    # --- xattrs: none ---------------------------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes):
        raise OSError(errno.ENODATA, name.decode(errors="replace"))

    def setxattr(self, ino: int, name: bytes):
        raise OSError(errno.EINVAL if self._kind(ino) == "mem" else errno.ENOTSUP, "no extended attributes")

    def removexattr(self, ino: int, name: bytes):
        raise OSError(errno.ENODATA, name.decode(errors="replace"))

    # --- open/read/write ----------------------------------------------------------------------------
    def open(self, ino: int, flags: int, caller) -> Opened:
        kind = self._kind(ino)
        if kind in ("root", "dir"):
            raise OSError(errno.EISDIR, f"inode {ino}")
        entry = None if ino == MOUNT_CTL_INO else self._entry(ino)
        accmode = flags & os.O_ACCMODE
        if kind in ("status", "snapshot") and accmode != os.O_RDONLY:
            raise OSError(errno.EACCES, f"{kind} is read-only")
        if kind == "mem" and flags & os.O_TRUNC:
            raise OSError(errno.EINVAL, "the size never changes")
        result = b""
        if kind == "status":
            result = self.files.status(entry)
        elif kind == "snapshot":
            result = self.files.snapshot(entry, caller[0])  # counted against the opener's bound
        fh = self.ns.open(entry, kind, ino=ino, writable=accmode != os.O_RDONLY, result=result,
                          opener=tuple(caller[:2]))
        if kind in ("mem", "private"):
            return Opened(fh, direct_io=True, keep_cache=True, nonseekable=True)
        return Opened(fh, direct_io=True, nonseekable=kind == "ctl")

    def read(self, ino: int, fh: int, off: int, size: int, read_syscall: bool):  # bytes, or Deferred bytes
        handle = self._file_handle(ino, fh, "read", errno.EISDIR)
        if handle.kind == "mem":
            return self.files.mem_read(handle.entry, off, size, read_syscall=read_syscall)
        if handle.kind == "private":
            return self.files.private_read(handle.entry, off, size, read_syscall=read_syscall)
        if not read_syscall:
            raise OSError(errno.EIO, f"{handle.kind} cannot be mapped")
        if handle.kind == "guest":
            return Deferred(lambda: self.files.guest_read(handle.entry, off, size), _key(handle))
        if handle.kind == "ctl":
            # The result is read from its start after every request, whatever the file position (a
            # write moved it); successive reads continue, so `cat` sees EOF.
            chunk = handle.result[handle.read_pos:handle.read_pos + size]
            handle.read_pos += len(chunk)
            return chunk
        return handle.result[off:off + size]  # status/snapshot: the content at open (rendered as read)

    def write(self, ino: int, fh: int, off: int, buf, writepage: bool) -> int | Deferred:
        handle = self._file_handle(ino, fh, "write", errno.EISDIR)
        if handle.kind == "mem":
            return self.files.mem_write(handle.entry, off, buf, writepage=writepage)
        if handle.kind == "private":
            return self.files.private_write(handle.entry, off, buf, writepage=writepage)
        if writepage:
            raise OSError(errno.EIO, f"{handle.kind} cannot be mapped")
        if handle.kind not in ("guest", "ctl"):
            raise OSError(errno.EBADF, f"{handle.kind} is read-only")
        try:
            data, held = self._copy(handle, buf)  # the buffer is libfuse's, reused once we return
        except OSError as exc:
            if handle.kind == "ctl":  # the read-back says why, as for a request that ran
                self.ns.set_result(handle, protocol.error_result(None, exc))
                handle.read_pos = 0
            raise
        if handle.kind == "guest":
            return Deferred(lambda: self._holding(handle, held, self.files.guest_write, handle.entry, off, data),
                            _key(handle))
        return Deferred(lambda: self._holding(handle, held, self._request, handle, data), _key(handle))

    def _copy(self, handle: Handle, buf) -> tuple[bytes, int]:
        """A copy of a write's data for deferred work, counted against the opener's ``results`` bound
        (server memory held for the user) until the work ends: a request may wait in the executor's queue
        for long, and one user's thousands of waiting 1 MiB guest writes would otherwise hold gigabytes.
        ENOMEM past the bound, before anything is copied; up to SMALL_RESULT bytes are always granted."""
        held = self.ns.users.take(handle.opener[0], "results", len(buf), force=len(buf) <= SMALL_RESULT)
        return bytes(buf), held

    def _holding(self, handle: Handle, held: int, work, *args):
        try:
            return work(*args)
        finally:
            self.ns.users.give(handle.opener[0], "results", held)

    def _request(self, handle: Handle, data: bytes) -> int:
        if handle.entry is None:
            result, error, removed = self.files.mount_request(data, handle.opener)
            if removed is not None and self.on_destroy is not None:
                self.on_destroy(removed)
        else:
            result, error = self.files.file_request(handle.entry, data, handle.opener[0])
        try:
            self.ns.set_result(handle, result)  # ENOMEM past the opener's bound on held results
        except OSError as exc:  # (only a result with no side effect is big: get_attributes)
            self.ns.set_result(handle, protocol.error_result(None, exc))
            error = exc
        handle.read_pos = 0
        if error is not None:
            raise OSError(error.errno or errno.EIO, str(error))
        return len(data)

    def ioctl(self, ino: int, fh: int, cmd: int, flags: int, arg: bytes, out_size: int) -> Deferred:
        handle = self._file_handle(ino, fh, "ioctl", errno.ENOTTY)
        if handle.kind != "mem":
            raise OSError(errno.ENOTTY, f"{handle.kind} has no ioctls")
        return Deferred(lambda: IoctlReply(*self.files.ioctl(handle.entry, cmd, arg,
                                                             compat=bool(flags & FUSE_IOCTL_COMPAT),
                                                             writable=handle.writable)), _key(handle))

    def fallocate(self, ino: int, fh: int, mode: int, offset: int, length: int) -> Deferred:
        handle = self._file_handle(ino, fh, "fallocate", errno.EISDIR)
        if handle.kind != "mem":
            raise OSError(errno.EOPNOTSUPP, f"{handle.kind} cannot be allocated")
        return Deferred(lambda: self.files.fallocate(handle.entry, mode, offset, length), _key(handle))

    def fsync(self, ino: int, fh: int, datasync: bool) -> None:
        """guest_memfd has no fsync method, so fsync, fdatasync and msync(MS_SYNC) of it are EINVAL.

        Only ``mem`` refuses; every other file succeeds. The kernel has already written the dirty pages
        back by the time it sends FUSE_FSYNC, which is harmless: they are shared pages, and the backend
        holds them anyway. Nothing in ufsgmem fsyncs ``mem``: revocation writes back with
        sync_file_range, which never sends FUSE_FSYNC.
        """
        if self._kind(ino) in ("root", "dir"):  # FSYNCDIR, not FSYNC, is what a directory's fsync sends
            return
        if self.ns.handle(fh, ino).kind == "mem":
            raise OSError(errno.EINVAL, "guest_memfd has no fsync")

    def release(self, ino: int, fh: int) -> Deferred | None:
        freed = self.ns.release(fh, ino)
        if freed is not None:  # the memory is gone: drop the (clean) pages the kernel still caches of it
            return Deferred(lambda: self.files.drop_cache(freed), freed.dir_ino)
        return None
