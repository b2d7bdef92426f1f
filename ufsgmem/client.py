"""A small Python client for a mounted ufsgmem filesystem: files by path, requests through the control files.

Nothing here talks to the server any other way than an unmodified program would: ``open``, ``write``,
``read``, ``pread``/``pwrite`` and ``mmap`` on the files of the mount (design §2.2, docs/design.md)::

    from ufsgmem.client import Mount
    with Mount("/mnt/gmem").create("vm0", "64M", flags="mmap|init_shared") as f:
        with f.map() as m:                      # MAP_SHARED mapping of vm0/mem
            a = m.array()                       # numpy uint8 view, zero copy
            a[:4096] = 7
            del a                               # drop every view before the mapping closes
        f.convert(0, 4096, to="private")        # revokes the page from every process
        assert f.guest_read(0, 1) == b"\\x07"   # the guest still sees it

Conversions are the kernel's own call, ``ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)``. Everything else uses
the text form of the control files, create included: its result carries the server's message (e.g. a
hugetlb pool's shortfall), which the binary read-back has no room for. The wire format, both ends of it
(``create_request()`` for the binary form, the text grammar, ``Result``), is :mod:`ufsgmem.protocol`;
this module does the I/O. A failed request raises :class:`~ufsgmem.errors.GuestMemfdError`: an
``OSError`` with the kernel's errno and, where the kernel defines one, ``error_offset``.

Caveats:

* A host access to a private page raises SIGBUS in *this* process, which Python cannot survive. Touch
  memory that may be private only from a child process (or through ``guest_read``).
* ``mmap`` cannot close while a numpy view or memoryview of it exists (``BufferError``). Drop every view
  (``del a``) before ``Mapping.close()``, before leaving its ``with`` block, and before ``GmemFile.close()``.
* Closing the file does not free the memory while a mapping exists, as in the kernel; ``destroy`` removes
  the name, and the memory goes with the last open file and mapping.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import stat
import threading

import numpy as np

from .address import format_size, parse_size
from .errors import GuestMemfdError, errname
from .mounts import FSTYPE, mount_type
from .protocol import (
    NAME_MAX, Result, attributes2, check_u64, create_text, cstr_field, error_offset_of, parse_attributes,
    parse_flags, parse_runs, ranged_text,
)
from .uapi import GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2

RESULT_CHUNK = 1 << 16


# --- control-file I/O -------------------------------------------------------------------------------------
def _read_result(fd: int) -> bytes:
    """The whole result of the last request on ``fd``, however long (a read after a request starts at
    the result's beginning; successive reads continue until an empty one)."""
    chunks = []
    while True:
        chunk = os.read(fd, RESULT_CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_request(fd: int, request: bytes) -> OSError | None:
    """One request = one write(); returns the write's error (None on success)."""
    try:
        written = os.write(fd, request)
    except OSError as exc:
        return exc
    if written != len(request):  # cannot happen with direct_io control files; never retry a request
        return OSError(errno.EIO, f"short write of a control request ({written} of {len(request)} bytes)")
    return None


def text_request(fd: int, request: str, what: str | None = None) -> Result:
    """Send one text request; return its parsed result, or raise GuestMemfdError with its errno."""
    err = _write_request(fd, request.encode() + b"\n")
    try:
        result = Result.parse(_read_result(fd).decode(errors="replace"))
    except OSError:
        if err is None:
            raise
        result = Result(False, {}, [], "", "")  # the write failed and left no result to read
    if err is not None:
        what = what or request
        raise GuestMemfdError(err.errno, f"{what}: {result.message}" if result.message else what,
                              result.int("error_offset"))
    return result


# --- the mount --------------------------------------------------------------------------------------------
def check_mount(path: str) -> None:
    """EINVAL unless ``path`` is a ufsgmem mount point: requests are written to files called ``ctl``, and
    any directory can have one."""
    mounted = mount_type(path)
    if mounted != FSTYPE:
        what = f"a {mounted} mount" if mounted else "not a mount point"
        raise GuestMemfdError(errno.EINVAL, f"{path} is not a ufsgmem mount ({what}); "
                                            f"mount one with `ufsgmem mount {path}`")


class Mount:
    """A mounted ufsgmem filesystem: creates, opens and destroys guest_memfd files through ``ctl``.

    One request at a time per object (a lock): a request and the read of its result must not interleave
    with another thread's on the same control file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        check_mount(self.path)
        self._ctl: int | None = None
        self._lock = threading.Lock()

    def _ctl_fd(self) -> int:
        if self._ctl is None:
            self._ctl = os.open(os.path.join(self.path, "ctl"), os.O_RDWR | os.O_CLOEXEC)
        return self._ctl

    def create(self, name: str, size: int | str, flags: int | str | None = 0, *, backend: str | None = None,
               page_size: int | str | None = None, in_place_conversion: bool | None = None) -> "GmemFile":
        """KVM_CREATE_GUEST_MEMFD: a new file ``MOUNT/NAME`` of ``size`` bytes; returns it opened.

        ``flags`` is the kernel's flag word (or ``"mmap|init_shared"``); ``page_size`` picks the huge page
        size (2M, 1G) of backends that have one. Errors are the kernel's (EINVAL for bad size or flags),
        plus EEXIST for a name in use and ENOMEM when a hugetlb pool is too small. ``in_place_conversion``
        False makes this file play a kernel without in-place conversion (KVM_SET_MEMORY_ATTRIBUTES2 is
        ENOTTY); None takes the mount's default.
        """
        size, flags = parse_size(size), parse_flags(flags)
        check_u64(size=size, flags=flags)
        cstr_field(name, NAME_MAX, "name")  # the server keeps room for the NUL: at most 63 bytes
        # The text form, not the binary one: its result carries the server's message (a hugetlb shortfall,
        # the backends available), which the binary read-back has no room for. protocol.create_request() builds
        # the binary form for callers that want it.
        request = create_text(name, size, flags, backend=backend,
                              page_size=None if page_size is None else parse_size(page_size),
                              in_place_conversion=in_place_conversion)
        with self._lock:
            text_request(self._ctl_fd(), request, f"create {name} ({format_size(size)}, flags {flags:#x}"
                                                  f"{', backend ' + backend if backend else ''})")
        return self.open(name)

    def destroy(self, name: str) -> None:
        """Remove ``MOUNT/NAME``; its memory goes with the last open file and mapping (ENOENT if absent)."""
        with self._lock:
            text_request(self._ctl_fd(), f"destroy {name}")

    def open(self, name: str) -> "GmemFile":
        return GmemFile(os.path.join(self.path, name))

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if n != "ctl")

    def close(self) -> None:
        if self._ctl is not None:
            os.close(self._ctl)
            self._ctl = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- one guest_memfd file ---------------------------------------------------------------------------------
class GmemFile:
    """An open guest_memfd file ``MOUNT/NAME``: ``mem``, ``ctl``, ``guest`` and ``status`` by path."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path).rstrip("/")
        self.name = os.path.basename(self.path)
        check_mount(os.path.dirname(self.path) or ".")
        try:
            st = os.stat(self.path)
        except OSError as exc:  # EACCES for another user's mount (0700), ENOENT for no such file
            raise GuestMemfdError(exc.errno, f"{self.path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise GuestMemfdError(errno.ENOENT, f"{self.path} is not a guest_memfd of a ufsgmem mount")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # one control request (write, then read its result) at a time

    def _fd(self, which: str) -> int:
        fd = self._fds.get(which)
        if fd is None:
            fd = self._fds[which] = os.open(os.path.join(self.path, which), os.O_RDWR | os.O_CLOEXEC)
        return fd

    def fileno(self) -> int:
        """The descriptor of ``mem`` (what a VMM would hand to KVM or mmap)."""
        return self._fd("mem")

    # --- attributes ---------------------------------------------------------------------------------
    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0) -> None:
        """``ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)``, exactly as a VMM calls it on a kernel with in-place
        conversion. Raises the kernel's errno, with ``error_offset`` where the kernel copies it back."""
        check_u64(offset=offset, size=size, attributes=attributes, flags=flags)
        arg = attributes2(offset, size, attributes, flags)
        try:
            fcntl.ioctl(self._fd("mem"), KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
        except OSError as exc:
            error_offset = error_offset_of(arg) if exc.errno in (errno.EAGAIN, errno.ENOMEM) else None
            to = "private" if attributes == KVM_MEMORY_ATTRIBUTE_PRIVATE else f"attributes {attributes:#x}" \
                if attributes else "shared"
            where = f" (error_offset {error_offset:#x})" if error_offset is not None else ""
            raise GuestMemfdError(exc.errno, f"convert [{offset:#x}, {offset + size:#x}) of {self.name} to "
                                             f"{to}{where}", error_offset) from None

    def convert(self, offset: int | str, size: int | str, to: str | int) -> None:
        """Convert ``[offset, offset + size)`` to ``"private"`` or ``"shared"`` (content is preserved).

        The same conversion as :meth:`set_memory_attributes`, sent as the ``NAME/ctl`` text request so
        that a refusal carries the server's reason (an ioctl can only return an errno)."""
        offset, size, attributes = parse_size(offset), parse_size(size), parse_attributes(to)
        check_u64(offset=offset, size=size, attributes=attributes)
        to = "private" if attributes == KVM_MEMORY_ATTRIBUTE_PRIVATE else "shared" if attributes == 0 \
            else f"attributes {attributes:#x}"
        self._text(ranged_text("set_memory_attributes", offset, size, attributes=attributes),
                   f"convert [{offset:#x}, {offset + size:#x}) of {self.name} to {to}")

    def _text(self, request: str, what: str | None = None) -> Result:
        with self._lock:
            return text_request(self._fd("ctl"), request, what)

    def get_attributes(self, offset: int | str = 0, size: int | str | None = None) -> list[tuple[int, int, int]]:
        """``(offset, size, attributes)`` runs covering the range (the whole file by default)."""
        request = "get_attributes"
        if size is not None:
            request = ranged_text(request, parse_size(offset), parse_size(size))
        elif offset:
            request = ranged_text(request, parse_size(offset), self.size - parse_size(offset))
        return parse_runs(self._text(request).text)

    # --- fallocate and pins (text form) -------------------------------------------------------------
    def _ranged(self, verb: str, offset, size) -> None:
        offset, size = parse_size(offset), parse_size(size)
        self._text(ranged_text(verb, offset, size), f"{verb} [{offset:#x}, {offset + size:#x}) of {self.name}")

    def allocate(self, offset: int | str, size: int | str) -> None:
        """fallocate(FALLOC_FL_KEEP_SIZE): make the range present (EINVAL past EOF or unaligned)."""
        self._ranged("allocate", offset, size)

    def punch_hole(self, offset: int | str, size: int | str) -> None:
        """fallocate(KEEP_SIZE|PUNCH_HOLE): free the range, which then reads as zeros; attributes stay."""
        self._ranged("punch_hole", offset, size)

    def pin(self, offset: int | str, size: int | str) -> None:
        """An emulated long-term pin (a device's): makes shared→private over it fail with EAGAIN."""
        self._ranged("pin", offset, size)

    def unpin(self, offset: int | str, size: int | str) -> None:
        self._ranged("unpin", offset, size)

    # --- state --------------------------------------------------------------------------------------
    def status(self) -> dict:
        """The ``status`` file, parsed (size, flags, backend, page_size, byte counts, counters, ...)."""
        with open(os.path.join(self.path, "status"), "rb") as f:
            return json.loads(f.read())

    @property
    def size(self) -> int:
        return os.stat(os.path.join(self.path, "mem")).st_size

    def snapshot(self):
        """A :class:`~ufsgmem.snapshot.Snapshot` of the file's state (``NAME/snapshot``), for exporters.

        Servers without a ``snapshot`` file get one built from ``get_attributes`` and ``status``
        (attributes only: no physical extents, split folios or pins).
        """
        from .snapshot import Snapshot
        try:
            with open(os.path.join(self.path, "snapshot"), "rb") as f:
                return Snapshot.from_json(f.read().decode())
        except FileNotFoundError:
            pass
        status, runs = self.status(), self.get_attributes()
        return Snapshot.build(
            size=status["size"], flags=status["flags"], backend=status["backend"],
            folio_size=status["page_size"], attr_starts=[r[0] for r in runs],
            attr_private=[r[2] == KVM_MEMORY_ATTRIBUTE_PRIVATE for r in runs], meta={"name": self.name},
        )

    # --- guest accesses (vCPU stand-in) -------------------------------------------------------------
    def guest_read(self, offset: int, size: int) -> bytes:
        """What a vCPU reads: every page, private ones included."""
        data = os.pread(self._fd("guest"), size, offset)
        if len(data) != size:
            raise GuestMemfdError(errno.EINVAL, f"guest read [{offset:#x}, {offset + size:#x}) of {self.name} "
                                  f"returned {len(data)} bytes")
        return data

    def guest_write(self, offset: int, data) -> None:
        data = memoryview(data).cast("B")
        written = os.pwrite(self._fd("guest"), data, offset)
        if written != len(data):
            raise GuestMemfdError(errno.EIO, f"guest write at {offset:#x} of {self.name} wrote {written} of "
                                  f"{len(data)} bytes")

    # --- mappings -----------------------------------------------------------------------------------
    def map(self, offset: int = 0, length: int | None = None, *, writable: bool = True) -> "Mapping":
        """A MAP_SHARED mapping of ``mem`` (ENODEV without the MMAP flag, as in the kernel).

        The mount itself cannot refuse such an mmap(2) (FUSE never sees it; every access would SIGBUS), so
        the client gives the kernel's answer before mapping."""
        if not self.status()["flags"] & GUEST_MEMFD_FLAG_MMAP:
            raise GuestMemfdError(errno.ENODEV, f"{self.name} was created without mmap: it cannot be mapped")
        length = self.size - offset if length is None else length
        return Mapping(self.fileno(), offset, length, writable)

    def close(self) -> None:
        """Close the descriptors (mappings stay valid and keep the memory, as in the kernel)."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Mapping:
    """A MAP_SHARED mapping of ``mem``. ``array()`` gives numpy views; drop them before ``close()``.

    The package's one mapping: :class:`ufsgmem.testing.GmemMapping` wraps it in the testing kit's names (a
    cached ``.array``, ``view()``, ``address``) for a guest_memfd of any target."""

    def __init__(self, fd: int, offset: int, length: int, writable: bool = True):
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.offset, self.length = offset, length
        self.mmap = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)

    def array(self, dtype=np.uint8, offset: int = 0, count: int = -1) -> np.ndarray:
        """A zero-copy numpy view of the mapping (``offset`` is relative to the mapping, in bytes).

        Touching a private page through it raises SIGBUS in this process. The view keeps the mmap
        open: ``close()`` raises BufferError until every view is gone.
        """
        return np.frombuffer(self.mmap, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        """Unmap (again is a no-op). BufferError while a numpy view or memoryview of it exists."""
        try:
            self.mmap.close()
        except BufferError as exc:
            raise BufferError("a numpy view or memoryview of this mapping still exists: drop it "
                              "(del the array) before closing the mapping") from exc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def error_name(exc: OSError) -> str:
    """``EAGAIN`` for an OSError with errno 11 (for messages)."""
    return errname(exc.errno) if exc.errno is not None else type(exc).__name__
