"""The behaviour cases: every row of the kernel selftest (design §7.6.1) that applies, and the errno tables
of design §7.2 and §7.3.2, each as one function from a subject to an *observation*. A case's ``ref`` cites
docs/design.md: §7.N.M are the kernel facts there.

An observation is a plain dict of short strings (``"ok"``, an errno name, ``"SIGBUS"``, a byte picture
from :func:`~ufsgmem.conformance.mapping.runs`), built only from what a program can see, so the runner
can compare the kernel's with ufsgmem's by equality. Cases that the selftest runs per flag set are
expanded per flag set (``file_size[mmap|init_shared]``), as ``gmem_test()`` does.

Two kinds of case:

* **differential** (the default): run on the kernel and on ufsgmem; they must agree, or the case must
  be listed in :mod:`ufsgmem.conformance.deviations` with the reason.
* **v8** (``v8=...`` given): conversion rules of the in-place conversion series, which this kernel
  (6.18, a default VM, no memory attributes) cannot run: its ioctl is ENOTTY. ufsgmem's observation is
  checked against the expected one recorded in the case (``v8=``, from design §7.3) instead, and the
  kernel's is shown as it is.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from ..errors import errname
from ..uapi import (
    FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_ZERO_RANGE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, MADV_COLLAPSE, MADV_DONTNEED, MADV_HUGEPAGE, PAGE_SIZE, SZ_2M,
)
from ..kvm import GuestExit
from .mapping import MAP_PRIVATE, MAP_SHARED, MPOL_BIND, MPOL_DEFAULT, MPOL_INTERLEAVE, MS_ASYNC, MS_SYNC
from .subjects import ACCESS, ATTRIBUTES, FD, GUEST, MMAP, PIN, NotApplicable

PS = PAGE_SIZE
_libc = ctypes.CDLL(None, use_errno=True)
KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
FLAGSETS = {"0": 0, "mmap": GUEST_MEMFD_FLAG_MMAP,
            "mmap|init_shared": GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED}
ALL, MAPPABLE, SHARED_ONLY = tuple(FLAGSETS), ("mmap", "mmap|init_shared"), ("mmap|init_shared",)

Observation = dict


@dataclass(frozen=True)
class Case:
    name: str
    ref: str  # where the rule comes from (a docs/design.md section / selftest)
    what: str  # one line: what is checked
    run: Callable  # run(subject) -> Observation
    needs: frozenset = field(default_factory=frozenset)
    v8: Observation | None = None  # the expected observation (design §7.3), for rules the kernel lacks


CASES: list[Case] = []


def case(ref: str, what: str, needs=(), flagsets=(None,), v8=None):
    """Register ``fn(subject, file_flags)`` once per flag set (``None``: not expanded)."""
    def register(fn):
        for key in flagsets:
            name = fn.__name__ if key is None else f"{fn.__name__}[{key}]"
            flags = None if key is None else FLAGSETS[key]
            CASES.append(Case(name, ref, what, (lambda s, fn=fn, flags=flags: fn(s, flags)),
                              frozenset(needs), v8))
        return fn
    return register


def name(err: int) -> str:
    """The errno's name; EOPNOTSUPP rather than its alias ENOTSUP, as the kernel sources spell it."""
    return "EOPNOTSUPP" if err == errno.EOPNOTSUPP else errname(err)


def attempt(fn, *args) -> str:
    """``ok`` (or ``ok:<value>`` when fn returns something printable) or the errno name."""
    try:
        value = fn(*args)
    except NotApplicable:
        raise
    except OSError as exc:
        offset = getattr(exc, "error_offset", None)
        return name(exc.errno) + (f"@{offset:#x}" if offset is not None and exc.errno == errno.EAGAIN else "")
    return f"ok:{value}" if isinstance(value, int) and value != 0 else "ok"


def compress(results: dict[int, str]) -> str:
    """``{1: 'EINVAL', 2: 'EINVAL', 5: 'ok'}`` → ``'1-2:EINVAL 5:ok'``: stable and short."""
    parts, keys = [], sorted(results)
    i = 0
    while i < len(keys):
        j = i
        while j + 1 < len(keys) and keys[j + 1] == keys[j] + 1 and results[keys[j + 1]] == results[keys[i]]:
            j += 1
        span = f"{keys[i]}" if i == j else f"{keys[i]}-{keys[j]}"
        parts.append(f"{span}:{results[keys[i]]}")
        i = j + 1
    return " ".join(parts)


def created(subject, size: int, flags: int, reserved=None) -> str:
    try:
        subject.create(size, flags, reserved)
    except OSError as exc:
        return name(exc.errno)
    return "ok"


# --- KVM_CREATE_GUEST_MEMFD (§7.1) ----------------------------------------------------------------------
@case("§7.6.1 guest_memfd_flags, §7.1.2",
      "each single flag bit 0..63: inside the supported mask creates, else EINVAL")
def guest_memfd_flags(s, _):
    return {"bits": compress({bit: created(s, PS, 1 << bit) for bit in range(64)}),
            "mmap|init_shared": created(s, PS, 3)}


@case("§7.6.1 create_guest_memfd_multiple, §7.1.4", "files of 1 and 2 pages: right st_size, different st_ino",
      needs={FD})
def create_guest_memfd_multiple(s, _):
    a, b = s.create(PS, 0), s.create(2 * PS, 0)
    sa, sb = os.fstat(a.fd), os.fstat(b.fd)
    return {"st_size": f"{sa.st_size},{sb.st_size}", "st_ino distinct": str(sa.st_ino != sb.st_ino)}


@case("§7.6.1 create_guest_memfd_invalid_sizes, §7.1.3", "sizes 0..ps (every one) and a few past it",
      flagsets=ALL)
def create_guest_memfd_invalid_sizes(s, flags):
    sizes = list(range(PS + 1)) + [PS + 1, 2 * PS - 1]
    return {"sizes": compress({size: created(s, size, flags) for size in sizes}),
            "size 1<<63 (negative loff_t)": created(s, 1 << 63, flags)}


@case("§7.1.1", "the six reserved words of kvm_create_guest_memfd are never checked (mainline)")
def create_reserved_words(s, _):
    zero = (0,) * 6
    return {"all 0": created(s, PS, 0, zero), "reserved[0]=1": created(s, PS, 0, (1,) + zero[1:]),
            "reserved[5]=1": created(s, PS, 0, zero[:5] + (1,))}


@case("§7.1.3", "no upper bound and no allocation at creation: 1 TiB, 2^62 and LOFF_MAX rounded down")
def create_huge_sizes(s, _):
    return {f"{size:#x}": created(s, size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
            for size in (1 << 40, 1 << 62, (1 << 63) - PS)}


# --- the file (§7.2.1, §7.2.4, §7.2.5, §7.2.6, §7.1.4) ---------------------------------------------------
@case("§7.6.1 file_read_write, §7.2.1", "read/write/pread/pwrite fail (errnos), lseek ESPIPE", needs={FD},
      flagsets=ALL)
def file_read_write(s, flags):
    f = s.create(4 * PS, flags)
    return {"read": attempt(os.read, f.fd, 8), "write": attempt(os.write, f.fd, b"x"),
            "pread": attempt(os.pread, f.fd, 8, 0), "pwrite": attempt(os.pwrite, f.fd, b"x", 0),
            "lseek": attempt(os.lseek, f.fd, 0, os.SEEK_SET)}


@case("§7.6.1 file_size, §7.2.4", "st_size is the creation size, st_blksize the page size", needs={FD},
      flagsets=ALL)
def file_size(s, flags):
    st = os.fstat(s.create(4 * PS, flags).fd)
    return {"st_size": str(st.st_size), "st_blksize": str(st.st_blksize)}


@case("§7.1.4", "a regular file, mode 0600, one link, owned by the creator", needs={FD})
def fstat_mode(s, _):
    st = os.fstat(s.create(PS, 0).fd)
    return {"type": "regular" if stat.S_ISREG(st.st_mode) else oct(stat.S_IFMT(st.st_mode)),
            "mode": oct(stat.S_IMODE(st.st_mode)), "nlink": str(st.st_nlink),
            "owner": "creator" if (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid()) else "other"}


@case("§7.2.4, §7.6.3", "st_blocks stays 0 upstream, whatever is allocated", needs={FD}, flagsets=ALL)
def st_blocks(s, flags):
    f = s.create(4 * PS, flags)
    before = os.fstat(f.fd).st_blocks
    f.fallocate(KEEP, 0, 4 * PS)
    return {"fresh": str(before), "allocated": str(os.fstat(f.fd).st_blocks)}


@case("§7.2.1", "other ways in: fsync/fdatasync, sendfile and copy_file_range from the file, fadvise, "
      "flock", needs={FD}, flagsets=SHARED_ONLY)
def file_other_io(s, flags):
    f = s.create(4 * PS, flags)
    with tempfile.TemporaryFile() as out:
        return {"fsync": attempt(os.fsync, f.fd), "fdatasync": attempt(os.fdatasync, f.fd),
                "sendfile": attempt(os.sendfile, out.fileno(), f.fd, 0, PS),
                "copy_file_range": attempt(os.copy_file_range, f.fd, out.fileno(), PS, 0, 0),
                "fadvise DONTNEED": attempt(os.posix_fadvise, f.fd, 0, 0, os.POSIX_FADV_DONTNEED),
                "flock": attempt(fcntl.flock, f.fd, fcntl.LOCK_EX)}


@case("§7.1.4", "reopening the file through /proc/self/fd (an anonymous inode cannot be reopened)",
      needs={FD})
def reopen_via_proc(s, _):
    f = s.create(PS, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    try:
        os.close(os.open(f"/proc/self/fd/{f.fd}", os.O_RDWR))
    except OSError as exc:
        return {"open": name(exc.errno)}
    return {"open": "ok"}


@case("§7.2.6, §7.6.3", "setattr is EINVAL: ftruncate to any size, fchmod, fchown, utimes", needs={FD},
      flagsets=ALL)
def setattr_einval(s, flags):
    f = s.create(4 * PS, flags)
    st = os.fstat(f.fd)
    return {"ftruncate same": attempt(os.ftruncate, f.fd, 4 * PS), "ftruncate 0": attempt(os.ftruncate, f.fd, 0),
            "ftruncate grow": attempt(os.ftruncate, f.fd, 8 * PS),
            "fchmod": attempt(os.fchmod, f.fd, 0o600), "fchown": attempt(os.fchown, f.fd, st.st_uid, st.st_gid),
            "utimes": attempt(os.utime, f.fd)}


@case("§7.1.4, §7.6.3", "the fd is O_RDWR and has no FD_CLOEXEC", needs={FD})
def fd_flags(s, _):
    f = s.create(PS, 0)
    return {"FD_CLOEXEC": str(bool(fcntl.fcntl(f.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)),
            "access": {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}[
                fcntl.fcntl(f.fd, fcntl.F_GETFL) & os.O_ACCMODE]}


@case("§7.1.4", "fstatfs f_type of the file's filesystem", needs={FD})
def fstatfs_type(s, _):
    buf = (ctypes.c_long * 16)()  # struct statfs: f_type first
    if _libc.fstatfs(s.create(PS, 0).fd, buf) != 0:
        return {"f_type": name(ctypes.get_errno())}
    return {"f_type": hex(buf[0] & 0xFFFFFFFF)}


@case("§7.2.5", "ioctls guest_memfd does not have are ENOTTY: an unknown command, another size or direction "
      "of 0xd2, the VM-level KVM_SET_MEMORY_ATTRIBUTES issued on the file", needs={FD}, flagsets=ALL)
def ioctl_enotty(s, flags):
    f = s.create(4 * PS, flags)
    return {"_IO(0xAE, 0xff)": attempt(fcntl.ioctl, f.fd, 0xAEFF, 0),
            "_IOWR(0xAE, 0xd3, 128 bytes)": attempt(fcntl.ioctl, f.fd, 0xC080AED3, bytearray(128), True),
            "KVM_SET_MEMORY_ATTRIBUTES (VM ioctl)": attempt(fcntl.ioctl, f.fd, 0x4020AED2, bytearray(32), True)}


# --- mmap (§7.2.2) ---------------------------------------------------------------------------------------
@case("§7.6.1 mmap_not_supported, §7.2.2", "without MMAP, MAP_SHARED of a page and of the file is ENODEV",
      needs={MMAP}, flagsets=("0",))
def mmap_not_supported(s, flags):
    f = s.create(4 * PS, flags)
    return {"one page": attempt(f.mmap, PS), "whole file": attempt(f.mmap, 4 * PS)}


@case("§7.1.4, §7.2.2", "PROT_READ alone maps; PROT_EXEC is EPERM (the guest_memfd mount is noexec)",
      needs={MMAP}, flagsets=SHARED_ONLY)
def mmap_prot(s, flags):
    f = s.create(4 * PS, flags)
    return {"PROT_READ": attempt(f.mmap, PS, MAP_SHARED, 0x1),
            "PROT_READ|PROT_EXEC": attempt(f.mmap, PS, MAP_SHARED, 0x5)}


@case("§7.6.1 mmap_cow, §7.2.2", "MAP_PRIVATE fails (EINVAL)", needs={MMAP}, flagsets=MAPPABLE)
def mmap_cow(s, flags):
    f = s.create(4 * PS, flags)
    return {"MAP_PRIVATE": attempt(f.mmap, 4 * PS, MAP_PRIVATE)}


@case("§7.2.2", "mappings past EOF and at an offset (also past EOF) are allowed; only access faults",
      needs={MMAP, ACCESS}, flagsets=SHARED_ONLY)
def mmap_offsets(s, flags):
    f = s.create(4 * PS, flags)
    whole = f.mmap(4 * PS)
    fill = whole.run([("fill", 0, PS, 0x11), ("fill", PS, PS, 0x22)])
    at_page1 = f.mmap(PS, offset=PS)
    result = {"fill": ",".join(fill), "offset ps": ",".join(at_page1.run([("read", 0, 8)]))}
    result["offset size"] = attempt(f.mmap, PS, MAP_SHARED, 3, 4 * PS)
    if result["offset size"] == "ok":
        result["offset size access"] = ",".join(f._mappings[-1].run([("read", 0, 1)]))
    return result


# --- faults and content (§7.2.2, §7.2.3, §7.2.7, §7.2.8) -------------------------------------------------
@case("§7.6.1 mmap_supported", "memset 0xaa and read back; punch page 0: zeros there, 0xaa elsewhere; "
      "write page 0 again", needs={ACCESS}, flagsets=SHARED_ONLY)
def mmap_supported(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    before = m.run([("fill", 0, 4 * PS, 0xAA), ("read", 0, 4 * PS)])
    punch = attempt(f.fallocate, PUNCH, 0, PS)
    after = m.run([("read", 0, 4 * PS), ("fill", 0, PS, 0xAA), ("read", 0, 4 * PS)])
    return {"fill+read": ",".join(before), "punch page 0": punch, "read,refill,read": " | ".join(after)}


@case("§7.6.1 fault_overflow", "a 4x mapping: memset SIGBUS past EOF, reading byte `size` SIGBUS, in-file "
      "bytes keep 0xaa", needs={ACCESS}, flagsets=SHARED_ONLY)
def fault_overflow(s, flags):
    size = 4 * PS
    f = s.create(size, flags)
    m = f.mmap(4 * size)
    memset = m.run([("fill", 0, 4 * size, 0xAA)])
    read_eof = m.run([("read", size, 1)])
    return {"memset 4x": ",".join(memset), "read byte size": ",".join(read_eof),
            "in-file": ",".join(m.run([("read", 0, size)]))}


@case("§7.6.1 fault_private", "without INIT_SHARED every host access is SIGBUS", needs={ACCESS},
      flagsets=("mmap",))
def fault_private(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    return {"read": ",".join(m.run([("read", 0, 1)])), "write": ",".join(m.run([("fill", 3 * PS, 1, 1)]))}


@case("§7.2.8", "a page reads zero on first use, after allocate, and after punch + reuse", needs={ACCESS},
      flagsets=SHARED_ONLY)
def zero_on_first_use(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    first = m.run([("read", 0, 2 * PS)])
    f.fallocate(KEEP, 2 * PS, 2 * PS)
    allocated = m.run([("read", 2 * PS, 2 * PS), ("fill", 0, 4 * PS, 0x5A)])
    f.fallocate(PUNCH, PS, 2 * PS)
    return {"fresh": ",".join(first), "after allocate": ",".join(allocated),
            "after punch": ",".join(m.run([("read", 0, 4 * PS)]))}


@case("§7.2.2 coherence", "two mappings and a forked child see the same pages; punch zeroes all of them",
      needs={ACCESS}, flagsets=SHARED_ONLY)
def coherence(s, flags):
    f = s.create(4 * PS, flags)
    a, b = f.mmap(4 * PS), f.mmap(2 * PS, offset=2 * PS)
    a.run([("fill", 2 * PS, 2 * PS, 0x33)])
    via_b = b.run([("read", 0, 2 * PS), ("fill", PS, PS, 0x44)])
    via_a = a.run([("read", 2 * PS, 2 * PS)])
    f.fallocate(PUNCH, 2 * PS, PS)
    return {"b sees a": via_b[0], "a sees b": via_a[0], "after punch (b)": ",".join(b.run([("read", 0, 2 * PS)]))}


@case("§7.2.7", "close() while mapped keeps the memory and its content", needs={ACCESS, FD},
      flagsets=SHARED_ONLY)
def close_while_mapped(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    m.run([("fill", 0, 4 * PS, 0x77)])
    os.close(f.fd)
    f.fd = None
    return {"after close": ",".join(m.run([("read", 0, 4 * PS), ("fill", 0, 1, 0x78), ("read", 0, 2)]))}


@case("§7.6.1 collapse, §7.2.2", "one PMD: MADV_HUGEPAGE ok, MADV_COLLAPSE EINVAL, MADV_DONTNEED and re-read",
      needs={MMAP, ACCESS}, flagsets=SHARED_ONLY)
def collapse(s, flags):
    f = s.create(SZ_2M, flags)
    m = f.mmap(SZ_2M)
    fill = m.run([("fill", 0, SZ_2M, 0x5C)])
    return {"fill": ",".join(fill), "MADV_HUGEPAGE": m.madvise(0, SZ_2M, MADV_HUGEPAGE),
            "MADV_COLLAPSE": m.madvise(0, SZ_2M, MADV_COLLAPSE),
            "MADV_DONTNEED": m.madvise(0, SZ_2M, MADV_DONTNEED),
            "re-read": ",".join(m.run([("read", 0, SZ_2M)]))}


@case("§7.2.1", "msync of a dirty shared mapping: MS_ASYNC, and MS_SYNC (guest_memfd has no fsync method)",
      needs={MMAP, ACCESS}, flagsets=SHARED_ONLY)
def msync(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    m.run([("fill", 0, 4 * PS, 0x3C)])
    return {"MS_ASYNC": m.msync(0, 4 * PS, MS_ASYNC), "MS_SYNC": m.msync(0, 4 * PS, MS_SYNC),
            "content": ",".join(m.run([("read", 0, 4 * PS)]))}


@case("§7.6.1 mbind, §7.2.2", "NUMA policy on the mapping (node 0 only: this machine has one node): BIND, "
      "INTERLEAVE and DEFAULT round-trip through get_mempolicy; what a second mapping of the file reports; "
      "mode 999 is EINVAL",
      needs={MMAP}, flagsets=MAPPABLE)
def mbind(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    other = f.mmap(4 * PS)
    r = {}
    for label, mode in (("BIND", MPOL_BIND), ("INTERLEAVE", MPOL_INTERLEAVE), ("DEFAULT", MPOL_DEFAULT)):
        r[label] = m.mbind(0, 4 * PS, mode, 0 if mode == MPOL_DEFAULT else 1)
        r[f"{label} read back"] = m.get_mempolicy(0)
        r[f"{label} seen by another mapping"] = other.get_mempolicy(0)
    r["mode 999"] = m.mbind(0, 4 * PS, 999, 1)
    return r


@case("§7.6.1 guest_memfd_guest", "host writes 0xaa, a real vCPU reads it and writes 0xff, the host sees 0xff "
      "through a new mapping", needs={GUEST, ACCESS}, flagsets=SHARED_ONLY)
def guest_memfd_guest(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    m.run([("fill", 0, 4 * PS, 0xAA)])
    seen = f.guest_access(m, PS + 1, 0xFF)
    fresh = f.mmap(4 * PS)
    return {"guest read": f"{seen:02x}", "host (new mapping)": ",".join(fresh.run([("read", 0, 4 * PS)]))}


@case("§7.2.2, §7.6.2 (guest side)", "a vCPU touching a page the host may not map (no INIT_SHARED)",
      needs={GUEST, ACCESS}, flagsets=("mmap",))
def guest_private(s, flags):
    f = s.create(4 * PS, flags)
    m = f.mmap(4 * PS)
    try:
        seen = f"read {f.guest_access(m, PS, 0xFF):02x}"
    except GuestExit as exc:
        seen = f"KVM exit {exc.exit_name}"
    except OSError as exc:
        seen = f"KVM_RUN {name(exc.errno)}"
    return {"guest access": seen, "host read": ",".join(m.run([("read", PS, 1)]))}


# --- fallocate (§7.2.3) ----------------------------------------------------------------------------------
MODES = {"0": 0, "PUNCH_HOLE": FALLOC_FL_PUNCH_HOLE, "ZERO_RANGE": FALLOC_FL_ZERO_RANGE,
         "KEEP|ZERO_RANGE": KEEP | FALLOC_FL_ZERO_RANGE, "COLLAPSE_RANGE": FALLOC_FL_COLLAPSE_RANGE,
         "INSERT_RANGE": FALLOC_FL_INSERT_RANGE, "KEEP|UNSHARE_RANGE": KEEP | FALLOC_FL_UNSHARE_RANGE,
         "KEEP|PUNCH|ZERO_RANGE": PUNCH | FALLOC_FL_ZERO_RANGE, "KEEP|0x100": KEEP | 0x100}


@case("§7.2.3", "modes other than KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE are EOPNOTSUPP", flagsets=ALL)
def fallocate_modes(s, flags):
    f = s.create(4 * PS, flags)
    return {name: attempt(f.fallocate, mode, 0, PS) for name, mode in MODES.items()}


@case("§7.2.3 (VFS)", "the VFS checks: negative offset, zero or negative length, size overflow",
      flagsets=ALL)
def fallocate_vfs_checks(s, flags):
    f = s.create(4 * PS, flags)
    result = {}
    for verb, mode in (("allocate", KEEP), ("punch", PUNCH)):
        result[f"{verb} offset -ps"] = attempt(f.fallocate, mode, -PS, PS)
        result[f"{verb} len 0"] = attempt(f.fallocate, mode, 0, 0)
        result[f"{verb} len -ps"] = attempt(f.fallocate, mode, 0, -PS)
        result[f"{verb} overflow"] = attempt(f.fallocate, mode, (1 << 63) - PS, 2 * PS)
    return result


@case("§7.6.1 fallocate, §7.2.3", "the selftest matrix: whole file, unaligned, at/past EOF, punch past EOF, "
      "punch then re-allocate", flagsets=ALL)
def fallocate(s, flags):
    size = 4 * PS
    f = s.create(size, flags)
    steps = [("allocate whole", KEEP, 0, size), ("allocate offset ps-1", KEEP, PS - 1, PS),
             ("allocate len ps-1", KEEP, 0, PS - 1), ("punch offset ps-1", PUNCH, PS - 1, PS),
             ("punch len ps-1", PUNCH, 0, PS - 1), ("allocate at EOF", KEEP, size, PS),
             ("allocate past EOF", KEEP, size + PS, PS), ("allocate across EOF", KEEP, size - PS, 2 * PS),
             ("punch at EOF", PUNCH, size, PS), ("punch past EOF", PUNCH, size + PS, PS),
             ("punch across EOF", PUNCH, size - PS, 2 * PS), ("punch whole", PUNCH, 0, size),
             ("re-allocate whole", KEEP, 0, size)]
    return {name: attempt(f.fallocate, mode, offset, length) for name, mode, offset, length in steps}


PUNCH_TABLE = [(0, 1), (0, PS - 1), (0, PS + 1), (1, 1), (1, PS - 1), (1, PS), (1, PS + 1), (PS, 1),
               (PS, PS - 1), (PS, PS + 1)]


@case("§7.6.1 invalid_punch_hole", "the 10 unaligned (offset, len) pairs all give EINVAL", flagsets=ALL)
def invalid_punch_hole(s, flags):
    f = s.create(4 * PS, flags)
    return {f"({o},{n})": attempt(f.fallocate, PUNCH, o, n) for o, n in PUNCH_TABLE}


@case("§7.2.3, design §2.4", "fallocate(2) itself on the file (allocate and punch)", needs={FD},
      flagsets=SHARED_ONLY)
def fallocate_syscall(s, flags):
    f = s.create(4 * PS, flags)
    return {"allocate": attempt(f.fallocate_syscall, KEEP, 0, 4 * PS),
            "punch": attempt(f.fallocate_syscall, PUNCH, 0, PS),
            "mode 0": attempt(f.fallocate_syscall, 0, 0, PS)}


# --- KVM_SET_MEMORY_ATTRIBUTES2 (§7.3.2, v8) -------------------------------------------------------------
def _convert(f, offset, size, attributes, flags=0, reserved=(0,) * 11):
    return attempt(f.set_memory_attributes, offset, size, attributes, flags, reserved)


V8_ERRNO_TABLE = {
    "flags 1": "EINVAL", "reserved[0] 1": "EINVAL", "reserved[10] 1": "EINVAL", "attributes 1": "EINVAL",
    "attributes 0x10": "EINVAL", "attributes 0x9": "EINVAL", "size 0": "EINVAL", "offset+size wraps": "EINVAL",
    "offset unaligned": "EINVAL", "size unaligned": "EINVAL", "offset at EOF": "EINVAL",
    "range past EOF": "EINVAL", "to private": "ok", "to private again (no-op)": "ok", "back to shared": "ok",
}


@case("§7.3.2 validation order (v8)", "the KVM_SET_MEMORY_ATTRIBUTES2 errno table", needs={ATTRIBUTES},
      flagsets=SHARED_ONLY, v8=V8_ERRNO_TABLE)
def set_memory_attributes_errnos(s, flags):
    size = 4 * PS
    f = s.create(size, flags)
    r = {}
    r["flags 1"] = _convert(f, 0, PS, PRIVATE, flags=1)
    r["reserved[0] 1"] = _convert(f, 0, PS, PRIVATE, reserved=(1,) + (0,) * 10)
    r["reserved[10] 1"] = _convert(f, 0, PS, PRIVATE, reserved=(0,) * 10 + (1,))
    r["attributes 1"] = _convert(f, 0, PS, 1)
    r["attributes 0x10"] = _convert(f, 0, PS, 0x10)
    r["attributes 0x9"] = _convert(f, 0, PS, PRIVATE | 1)
    r["size 0"] = _convert(f, 0, 0, PRIVATE)
    r["offset+size wraps"] = _convert(f, (1 << 64) - PS, 2 * PS, PRIVATE)
    r["offset unaligned"] = _convert(f, 1, PS, PRIVATE)
    r["size unaligned"] = _convert(f, 0, PS + 1, PRIVATE)
    r["offset at EOF"] = _convert(f, size, PS, PRIVATE)
    r["range past EOF"] = _convert(f, size - PS, 2 * PS, PRIVATE)
    r["to private"] = _convert(f, 0, size, PRIVATE)
    r["to private again (no-op)"] = _convert(f, 0, size, PRIVATE)
    r["back to shared"] = _convert(f, 0, size, 0)
    return r


V8_PIN_TABLE = {"bulk to private, page 2 pinned": "EAGAIN@0x2000", "page 2 alone": "EAGAIN@0x2000",
                "page 1 alone": "ok", "no-op on the pinned page": "ok", "after unpin": "ok",
                "error_offset on success": "untouched"}


@case("§7.3.3, §7.6.2 elevated_refcount (v8)", "a pinned page: EAGAIN with error_offset; a no-op succeeds; "
      "error_offset is left alone on success", needs={ATTRIBUTES, PIN}, flagsets=SHARED_ONLY, v8=V8_PIN_TABLE)
def set_memory_attributes_pinned(s, flags):
    f = s.create(4 * PS, flags)
    f.pin(2 * PS, PS)
    r = {"bulk to private, page 2 pinned": _convert(f, 0, 4 * PS, PRIVATE),
         "page 2 alone": _convert(f, 2 * PS, PS, PRIVATE), "page 1 alone": _convert(f, PS, PS, PRIVATE),
         "no-op on the pinned page": _convert(f, 2 * PS, PS, 0)}
    f.unpin(2 * PS, PS)
    r["after unpin"] = _convert(f, 0, 4 * PS, PRIVATE)
    out = f.set_memory_attributes(0, 4 * PS, 0, error_offset=0x1234000)
    r["error_offset on success"] = "untouched" if out == 0x1234000 else hex(out)
    return r


def by_name() -> dict[str, Case]:
    return {c.name: c for c in CASES}
