"""The pyfuse3 ``Operations`` adapter: FUSE requests in, :class:`~ufsgmem.fuse.files.Files` calls out.

Thin on purpose: attributes, lookups and dispatch by file kind; the behaviour lives in ``files.py`` and
the core. ``OSError`` becomes ``FUSEError(errno)`` in one place (:func:`fuse_errors`); any other exception
is a bug, logged with its traceback and answered with EIO.

How ``mem`` keeps guest_memfd's file rules under FUSE (the mechanisms, each tested):

* **pread/pwrite → ESPIPE**: ``mem`` is opened nonseekable (FOPEN_NONSEEKABLE), which clears
  FMODE_PREAD/PWRITE; the kernel's pseudo-file gives the same errno. lseek is ESPIPE too.
* **write() → EINVAL**: ``mem`` reports a ``security.capability`` xattr. Before a write(2) (never before
  an mmap write-back) the VFS must strip it (``file_remove_privs``), so it asks us to remove it, and we
  refuse with EINVAL, which write(2) returns. So every FUSE WRITE that reaches ``mem`` is a write-back
  of a shared mapping. ftruncate fails the same way (and setattr is EINVAL anyway).
* **read() — deviation**: a read(2) fill and a page-fault fill are the same FUSE READ (pyfuse3 passes
  neither the read flags nor the file handle of the GETATTR that read(2) sends first), and pages already
  cached never reach the server. So read(2) of shared pages succeeds; of private pages it fails with EIO.
  Private bytes are never returned. (Untried idea for a lower-level binding: with auto_inval_data and
  attr_timeout 0 the kernel sends read(2) a GETATTR carrying FUSE_GETATTR_FH, which neither stat(2) nor
  a page fault sends; failing exactly that GETATTR with EINVAL should make read(2) EINVAL. pyfuse3 drops
  the file info of GETATTR, so it cannot be done here.)
* **no MMAP flag → ENODEV**: such a ``mem`` is opened with direct_io, and the kernel refuses a shared
  mapping of a direct_io file with ENODEV (no FUSE_DIRECT_IO_ALLOW_MMAP is negotiated). Its read/write go
  straight to us and fail with EINVAL.
* **MAP_PRIVATE — deviation**: FUSE never sees mmap(2); a private mapping of an MMAP file succeeds, and
  its page fills obey the same attribute checks (SIGBUS on private pages).
* **fallocate(2) — deviation**: EINVAL for every mode. FUSE strips privileges (the trap above) before it
  sends FUSE_FALLOCATE, and pyfuse3 has no fallocate handler anyway (the kernel would say EOPNOTSUPP).
  ``allocate``/``punch_hole`` on NAME/ctl provide it.
* **fsync/fdatasync/msync(MS_SYNC) → EINVAL**: FUSE_FSYNC of ``mem`` is refused (:meth:`Operations.fsync`).
* **PROT_EXEC → EPERM**: the mount is ``noexec`` like guest_memfd's internal mount (``server.py``).
* splice/sendfile/copy_file_range of ``mem`` never return private bytes (EIO, EINVAL, EXDEV here).
* ``keep_cache`` on every open: otherwise each open() would drop the whole file's page cache, revoking
  every mapping in every process.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time

import pyfuse3

from .. import control
from ..uapi import GUEST_MEMFD_FLAG_MMAP
from .files import Files
from .inodes import FILES, MOUNT_CTL_INO, ROOT_INO, Entry, Namespace

log = logging.getLogger(__name__)

XATTR_CAPS = b"security.capability"
# A version-2 vfs_cap_data with no capabilities: any non-empty value makes the VFS strip it on write().
CAPS_VALUE = bytes.fromhex("00000002") + bytes(16)
ATTR_TIMEOUT = 3600.0  # nothing about an inode changes behind the kernel's back except file contents


def fuse_errors(fn):
    """Convert OSError to FUSEError; log anything else as a bug and answer EIO."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False  # design §3: dirty pages must come back as FUSE WRITE on revocation

    def __init__(self, files: Files, uid: int, gid: int):
        super().__init__()
        self.files = files
        self.ns: Namespace = files.ns
        self.uid, self.gid = uid, gid
        self.started_ns = time.time_ns()
        self.on_destroy = None  # set by the server: invalidate a destroyed name's dentry

    # --- attributes ---------------------------------------------------------------------------------
    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self.started_ns
        attr.attr_timeout = attr.entry_timeout = ATTR_TIMEOUT
        attr.st_blksize = 4096
        attr.st_nlink = 1
        if ino == ROOT_INO:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o700, 2
        elif ino == MOUNT_CTL_INO:
            attr.st_mode = stat.S_IFREG | 0o600
        else:
            entry = self._entry(ino)
            kind = entry.kind(ino)
            if kind == "dir":
                attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o700, 2
            elif kind == "mem":
                attr.st_mode = stat.S_IFREG | 0o600
                attr.st_size = entry.gm.size
                attr.st_blksize = entry.gm.folio_size
            else:
                attr.st_mode = stat.S_IFREG | (0o400 if kind in ("status", "snapshot") else 0o600)
                if kind == "guest":
                    attr.st_size = entry.gm.size
        return attr

    def _entry(self, ino: int) -> Entry:
        entry = self.ns.entry_of(ino)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    @fuse_errors
    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    @fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        kind = self._kind(inode)
        if kind == "ctl" and fields.update_size and attr.st_size == 0 and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            return self._attr(inode)  # `echo REQUEST > ctl`: O_TRUNC of a control file is a no-op
        raise pyfuse3.FUSEError(errno.EINVAL)  # guest_memfd's setattr is always EINVAL

    def _kind(self, ino: int) -> str:
        if ino == ROOT_INO:
            return "root"
        if ino == MOUNT_CTL_INO:
            return "ctl"
        return self._entry(ino).kind(ino)

    # --- names --------------------------------------------------------------------------------------
    @fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        name = os.fsdecode(name)
        if parent_inode == ROOT_INO:
            if name == "ctl":
                ino = MOUNT_CTL_INO
            elif name in self.ns.by_name:
                ino = self.ns.by_name[name].dir_ino
            else:
                raise pyfuse3.FUSEError(errno.ENOENT)
        else:
            entry = self._entry(parent_inode)
            if entry.kind(parent_inode) != "dir" or name not in FILES or entry.destroyed:
                raise pyfuse3.FUSEError(errno.ENOENT)
            ino = entry.ino(name)
        attr = self._attr(ino)
        self.ns.looked_up(ino)
        return attr

    def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.ns.forget(ino, count)
            except Exception:  # forget must not raise
                log.exception("forget(%d, %d)", ino, count)

    @fuse_errors
    async def opendir(self, inode, ctx):
        if self._kind(inode) not in ("root", "dir"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh, start_id, token):
        if fh == ROOT_INO:
            names = [("ctl", MOUNT_CTL_INO)] + [(n, e.dir_ino) for n, e in sorted(self.ns.by_name.items())]
        else:
            entry = self._entry(fh)
            names = [] if entry.destroyed else [(k, entry.ino(k)) for k in FILES]
        for i, (name, ino) in enumerate(names[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attr(ino), i):
                break
            self.ns.looked_up(ino)  # READDIRPLUS hands the kernel a reference, as lookup does

    async def releasedir(self, fh):
        pass

    @fuse_errors
    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = control.NAME_MAX
        return st

    # --- xattrs: the write(2) trap on mem -----------------------------------------------------------
    @fuse_errors
    async def getxattr(self, inode, name, ctx):
        if name == XATTR_CAPS and self._kind(inode) == "mem":
            return CAPS_VALUE
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def listxattr(self, inode, ctx):
        return []

    @fuse_errors
    async def removexattr(self, inode, name, ctx):
        if self._kind(inode) == "mem":
            raise pyfuse3.FUSEError(errno.EINVAL)  # write(2)/ftruncate on guest_memfd: EINVAL
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.EINVAL if self._kind(inode) == "mem" else errno.ENOTSUP)

    # --- open/read/write ----------------------------------------------------------------------------
    @fuse_errors
    async def open(self, inode, flags, ctx):
        kind = self._kind(inode)
        if kind == "root" or kind == "dir":
            raise pyfuse3.FUSEError(errno.EISDIR)
        entry = None if inode == MOUNT_CTL_INO else self._entry(inode)
        accmode = flags & os.O_ACCMODE
        if kind in ("status", "snapshot") and accmode != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EACCES)
        if kind == "mem" and flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EINVAL)  # the size never changes
        fh = self.ns.open(entry, kind)
        if kind == "mem":
            mappable = bool(entry.gm.flags & GUEST_MEMFD_FLAG_MMAP)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, nonseekable=True, direct_io=not mappable)
        if kind in ("status", "snapshot"):
            handle = self.ns.handle(fh)
            handle.result = self.files.status(entry) if kind == "status" else self.files.snapshot(entry)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=kind == "ctl")

    @fuse_errors
    async def read(self, fh, off, size):
        handle = self.ns.handle(fh)
        if handle.kind == "mem":
            return self.files.mem_read(handle.entry, off, size)
        if handle.kind == "guest":
            return await self.files.guest_read(handle.entry, off, size)
        if handle.kind == "ctl":
            # The result is read from its start after every request, whatever the file position (a
            # write moved it); successive reads continue, so `cat` sees EOF.
            chunk = handle.result[handle.read_pos:handle.read_pos + size]
            handle.read_pos += len(chunk)
            return chunk
        return handle.result[off:off + size]  # status/snapshot: the content at open

    @fuse_errors
    async def write(self, fh, off, buf):
        handle = self.ns.handle(fh)
        if handle.kind == "mem":
            return self.files.mem_write(handle.entry, off, buf)
        if handle.kind == "guest":
            return await self.files.guest_write(handle.entry, off, buf)
        if handle.kind != "ctl":
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.entry is None:
            handle.result, error, removed = await self.files.mount_request(buf)
            if removed is not None and self.on_destroy is not None:
                await self.on_destroy(removed)
        else:
            handle.result, error = await self.files.file_request(handle.entry, buf)
        handle.read_pos = 0
        if error is not None:
            raise pyfuse3.FUSEError(error.errno or errno.EIO)
        return len(buf)

    @fuse_errors
    async def fsync(self, fh, datasync):
        """guest_memfd has no fsync method, so fsync, fdatasync and msync(MS_SYNC) of it are EINVAL.

        Only ``mem`` refuses; every other file succeeds. Never ENOSYS (pyfuse3's default): the kernel would
        take that as "this filesystem has no fsync", answer every later fsync of the mount with success
        itself and never ask again. The kernel has already written the dirty pages back by the time it
        sends FUSE_FSYNC, which is harmless: they are shared pages, and the backend holds them anyway.
        Nothing in ufsgmem fsyncs ``mem``: revocation writes back with sync_file_range, which never sends
        FUSE_FSYNC.
        """
        if self.ns.handle(fh).kind == "mem":
            raise pyfuse3.FUSEError(errno.EINVAL)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        freed = self.ns.release(fh)
        if freed is not None:  # the memory is gone: drop the (clean) pages the kernel still caches of it
            try:
                await self.files.drop_cache(freed)
            except OSError:
                log.exception("dropping the page cache of %s", freed.name)
