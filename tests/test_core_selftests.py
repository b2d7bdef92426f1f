"""The kernel's guest_memfd selftests, in our own words, against the in-process core (no FUSE).

Rows of design §7.6.1 (``guest_memfd_test.c``), §7.6.2 (v8 ``guest_memfd_conversions_test.c``) and the gaps of
§7.6.3 (docs/design.md), one test per behaviour. Like the kernel's ``gmem_test()`` driver, every test gets a
fresh file (the ``gmem``/``make`` fixtures close it afterwards) and runs for each flag set it applies to, out
of the matrix 0, MMAP, MMAP|INIT_SHARED, and for every backend that loads here: each installed
``ufsgmem.backends`` plugin at its default page size, and hugetlb with 2 MiB *and* 1 GiB pages (the pages are
reserved for the module and given back afterwards).

Translation rules:

* the host's mmap accesses are ``host_read``/``host_write``; a :class:`HostFault` is the kernel's SIGBUS;
* the vCPU's accesses are ``guest_read``/``guest_write``; they reach private and shared pages alike;
* with a huge page backend the *unit* is the huge page: fallocate alignment, punch and the file size use
  it (design §7.4.2), while attributes stay per 4 KiB page. INIT_SHARED is EINVAL at creation there, so
  the "MMAP|INIT_SHARED" flag set starts as an MMAP file converted to shared as a whole, the only way a
  huge-page file becomes host-accessible;
* a "page" in the conversion tests is a 4 KiB page, as in the kernel's tests.

Files are 4 units (2 for 1 GiB pages, to keep the memory bounded); contents are checked in chunks, so the
1 GiB case moves a few GiB per test at memcpy speed.
"""

from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest

from conftest import reserved_hugepages
from ufsgmem import plugins
from ufsgmem.address import U64_MAX, format_size
from ufsgmem.errors import GuestMemfdError, PluginError
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd, HostFault
from ufsgmem.uapi import (
    FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_ZERO_RANGE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    PAGE_SIZE, SZ_1G, SZ_2M,
)

PS = PAGE_SIZE
MMAP, INIT_SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
KEEP, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
LOFF_MAX = (1 << 63) - 1
CHUNK = 4 << 20  # content is written and compared in pieces of this size

FLAG_SETS = {"none": 0, "mmap": MMAP, "mmap+shared": MMAP | INIT_SHARED}
#: Huge pages each hugetlb module run reserves. This machine (a Firecracker VM) can hand out at most two
#: 1 GiB pages, so 1 GiB files are 2 units and create_multiple uses two 1-unit files there.
HUGEPAGES = {SZ_2M: 16, SZ_1G: 2}


# --- environments: backend × page size ----------------------------------------------------------------

@dataclass(frozen=True)
class Env:
    backend: str
    unit: int  # the folio size: fallocate alignment and size granularity

    @property
    def huge(self) -> bool:
        return self.unit > PS

    @property
    def size(self) -> int:
        """The default file size of a test: 4 units like the kernel's 4 pages (2 for 1 GiB pages)."""
        return (2 if self.unit >= SZ_1G else 4) * self.unit

    def create(self, flags: int, size: int | None = None, **kwargs) -> GuestMemfd:
        size = self.size if size is None else size
        return GuestMemfd(size, flags, backend=self.backend, page_size=self.unit, **kwargs)

    def start(self, flags: int, size: int | None = None, **kwargs) -> GuestMemfd:
        """The file a test starts from; huge-page files get INIT_SHARED by converting everything."""
        if self.huge and flags & INIT_SHARED:
            g = self.create(flags & ~INIT_SHARED, size, **kwargs)
            g.set_memory_attributes(0, g.size, SHARED)
            return g
        return self.create(flags, size, **kwargs)


def _env_params():
    params = []
    for name in plugins.available(plugins.BACKENDS):
        try:
            cls = plugins.load_backend(name)
        except PluginError as exc:
            params.append(pytest.param(None, id=name, marks=pytest.mark.skip(
                reason=f"backend {name!r} does not load yet: {exc}")))
            continue
        sizes = cls.page_sizes if name == "hugetlb" else cls.page_sizes[:1]
        for unit in sizes:
            label = f"{name}-{format_size(unit)}" if name == "hugetlb" else name
            params.append(pytest.param(Env(name, unit), id=label))
    return params


@pytest.fixture(scope="module", params=_env_params())
def env(request):
    env: Env = request.param
    if env.backend == "hugetlb":
        with reserved_hugepages(env.unit, HUGEPAGES[env.unit]):
            yield env
    else:
        yield env


@pytest.fixture
def make(env):
    """``make(flags, size=None, **kwargs)``: a fresh file (see Env.start), closed after the test."""
    opened: list[GuestMemfd] = []

    def make(flags: int, size: int | None = None, **kwargs) -> GuestMemfd:
        g = env.start(flags, size, **kwargs)
        opened.append(g)
        return g

    yield make
    for g in opened:
        g.close()


@pytest.fixture
def gmem(make, flags):
    return make(flags)


def flagsets(*names):
    """Run a test for these flag sets of the matrix (the kernel's driver picks tests by flags too)."""
    return pytest.mark.parametrize("flags", [FLAG_SETS[n] for n in names], ids=list(names))


ALL_FLAGS = flagsets("none", "mmap", "mmap+shared")


# --- content helpers ----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def pattern(value: int, size: int = CHUNK) -> bytes:
    return bytes([value]) * size


def _chunks(offset: int, size: int):
    end = offset + size
    while offset < end:
        n = min(CHUNK, end - offset)
        yield offset, n
        offset += n


def fill(g: GuestMemfd, offset: int, size: int, value: int, *, host: bool) -> None:
    write = g.host_write if host else g.guest_write
    for off, n in _chunks(offset, size):
        write(off, pattern(value, n))


def is_filled(g: GuestMemfd, offset: int, size: int, value: int, *, host: bool) -> bool:
    read = g.host_read if host else g.guest_read
    return all(bytes(read(off, n)) == pattern(value, n) for off, n in _chunks(offset, size))


def page(value: int) -> bytes:
    return pattern(value, PS)


def host_ok(g: GuestMemfd) -> bool:
    return bool(g.flags & MMAP)


def write_page(g: GuestMemfd, pg: int, value: int) -> None:
    """Write a whole page the way the test's world would: the host where it may, else the guest."""
    if host_ok(g) and g.attribute_at(pg * PS) == SHARED:
        g.host_write(pg * PS, page(value))
    else:
        g.guest_write(pg * PS, page(value))


def raw(g: GuestMemfd, offset: int, size: int) -> bytes:
    """Bytes straight from the backend: no rule check and no first-use allocation (for state snapshots)."""
    return bytes(g.backend.view(offset, size))


def sample_pages(g: GuestMemfd) -> list[int]:
    """Pages whose content state comparisons look at: the first and last few, and both sides of every unit
    boundary (everything, for small files)."""
    npages, step = g.size // PS, g.folio_size // PS
    pages = set(range(min(8, npages))) | set(range(max(0, npages - 4), npages))
    for b in range(step, npages, step):
        pages |= {b - 1, b}
    return sorted(pages)


def seed(g: GuestMemfd) -> None:
    """Give every sampled page its own content, so a lost or moved page shows."""
    for pg in sample_pages(g):
        g.guest_write(pg * PS, page(pg % 250 + 1))


def state(g: GuestMemfd):
    """Everything a failed call must leave alone: attributes, pins, allocation, sampled content."""
    status = g.status()
    return (
        g.get_attributes(),
        g.snapshot().pins.tolist() if status["pinned_bytes"] else [],
        status["allocated_bytes"],
        status["pinned_bytes"],
        {pg: raw(g, pg * PS, PS) for pg in sample_pages(g)},
    )


def expect_error(err: int, call, *args, g: GuestMemfd | None = None, **kwargs) -> GuestMemfdError:
    """``call`` fails with ``err``; with ``g`` given, the file's state is the same afterwards."""
    before = state(g) if g is not None else None
    with pytest.raises(OSError) as info:
        call(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"
    if g is not None:
        assert state(g) == before, f"a failed {call.__name__}{args} changed the file"
    return info.value


# ======================================================================================================
# design §7.6.1 guest_memfd_test.c
# ======================================================================================================

def test_flags_every_bit(env):
    """guest_memfd_flags: each single flag bit 0..63 creates a file when supported, else EINVAL."""
    for bit in range(64):
        flags = 1 << bit
        valid = flags == MMAP or (flags == INIT_SHARED and not env.huge)
        if valid:
            with env.create(flags, env.unit) as g:
                assert g.flags == flags
        else:
            err = expect_error(errno.EINVAL, env.create, flags, env.unit)
            if flags == INIT_SHARED:
                assert "init_shared" in err.detail, "huge-page files refuse INIT_SHARED, and say so"
            else:
                assert "flag" in err.detail
    for flags in (0, MMAP) + (() if env.huge else (MMAP | INIT_SHARED,)):
        with env.create(flags, env.unit) as g:
            assert g.flags == flags


def test_create_multiple(env):
    """create_guest_memfd_multiple: files of 1 and 2 units are distinct objects of the right size (two
    1-unit files with 1 GiB pages, of which this machine has only two)."""
    sizes = (env.unit, env.unit if env.unit >= SZ_1G else 2 * env.unit)
    with env.create(0, sizes[0]) as a, env.create(0, sizes[1]) as b:
        assert (a.size, b.size) == sizes
        assert (a.status()["size"], b.status()["size"]) == sizes
        assert a is not b and a.backend is not b.backend
        if a.backend.fileno() is not None:
            sa, sb = os.fstat(a.backend.fileno()), os.fstat(b.backend.fileno())
            assert (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino), "every file is its own inode"
        a.guest_write(0, b"only in a")
        assert bytes(b.guest_read(0, 9)) == bytes(9), "files never share memory"


def _bad_unit_multiples(env: Env) -> list[int]:
    """Page-aligned sizes that are no multiple of the huge page (all for 2 MiB, a sample for 1 GiB)."""
    if not env.huge:
        return []
    per_unit = env.unit // PS
    ks = range(1, per_unit) if per_unit <= 512 else sorted({1, 2, per_unit - 1, *range(1, per_unit, 997)})
    return [k * PS for k in ks] + [env.unit + k * PS for k in ks[:8]]


@ALL_FLAGS
def test_create_invalid_sizes(env, flags):
    """create_guest_memfd_invalid_sizes: every size 1..4095 is EINVAL, so are 0, negative, unaligned and
    over-large sizes; with huge pages so is any size that is not a multiple of the huge page."""
    for size in range(1, PS):
        expect_error(errno.EINVAL, env.create, flags, size)
    for size in (0, -PS, -1, PS + 1, 2 * PS - 1, 1 << 63, 1 << 64, -(1 << 63)):
        expect_error(errno.EINVAL, env.create, flags, size)
    for size in _bad_unit_multiples(env):
        expect_error(errno.EINVAL, env.create, flags, size)


@flagsets("mmap+shared")
def test_guest_memfd_guest(env, gmem):
    """guest_memfd_guest: host and guest see the same page: the host writes 0xaa, the guest reads it and
    writes 0xff, the host (through a fresh read, the new mapping) sees 0xff."""
    fill(gmem, 0, PS, 0xAA, host=True)
    assert is_filled(gmem, 0, PS, 0xAA, host=False)
    fill(gmem, 0, PS, 0xFF, host=False)
    assert is_filled(gmem, 0, PS, 0xFF, host=True)


@flagsets("none")
def test_host_access_without_mmap_faults(env, gmem):
    """file_read_write / mmap_not_supported: without MMAP the host never reaches the memory, even shared."""
    gmem.set_memory_attributes(0, 2 * PS, SHARED)
    for offset in (0, PS, gmem.size - PS):
        with pytest.raises(HostFault):
            gmem.host_read(offset, 1)
        with pytest.raises(HostFault):
            gmem.host_write(offset, b"x")
    assert bytes(gmem.guest_read(0, 4)) == bytes(4), "a refused host write stores nothing"


def test_init_shared_without_mmap(env):
    """INIT_SHARED without MMAP is accepted (only the flag mask is checked), but the host still faults."""
    if env.huge:
        expect_error(errno.EINVAL, env.create, INIT_SHARED)
        return
    with env.create(INIT_SHARED) as g:
        assert g.get_attributes() == [(0, g.size, SHARED)]
        with pytest.raises(HostFault):
            g.host_read(0, 1)


@flagsets("mmap+shared")
def test_mmap_supported(env, gmem):
    """mmap_supported: write 0xaa everywhere and read it back; punch the first unit, which reads zero while
    the rest keeps 0xaa; the punched unit can be written again."""
    size, unit = gmem.size, env.unit
    fill(gmem, 0, size, 0xAA, host=True)
    assert is_filled(gmem, 0, size, 0xAA, host=True)
    gmem.punch_hole(0, unit)
    assert is_filled(gmem, 0, unit, 0x00, host=True), "a punched page reads back as zero"
    assert is_filled(gmem, unit, size - unit, 0xAA, host=True), "punch leaves the other pages alone"
    fill(gmem, 0, unit, 0xAA, host=True)
    assert is_filled(gmem, 0, size, 0xAA, host=True)


@flagsets("mmap+shared")
def test_fault_overflow(env, gmem):
    """fault_overflow: a memset over four times the file size faults exactly at EOF; a read of byte
    ``size`` faults; the in-file bytes keep their value."""
    size = gmem.size
    step = math.gcd(CHUNK, size)  # pieces that tile the file, so one of them starts exactly at EOF
    faulted_at = None
    for off in range(0, 4 * size, step):
        try:
            gmem.host_write(off, pattern(0xAA, step))
        except HostFault as exc:
            faulted_at = exc.offset
            break
    assert faulted_at == size, "the first access past EOF faults, none before it"
    with pytest.raises(HostFault) as info:
        gmem.host_read(size, 1)
    assert info.value.offset == size
    for offset, length in ((size - 1, 2), (size + PS, 1), (4 * size - 1, 1)):
        with pytest.raises(HostFault):
            gmem.host_read(offset, length)
        with pytest.raises(HostFault):
            gmem.host_write(offset, bytes(length))
    assert is_filled(gmem, 0, size, 0xAA, host=True), "bytes inside the file keep their value"


@flagsets("mmap", "mmap+shared")
def test_host_fault_at_first_bad_byte(env, gmem, flags):
    """An access faults at its first byte the host may not touch: a private page inside the file comes
    before EOF. An empty access touches nothing: no fault inside the file, no page allocated."""
    g = gmem
    if not flags & INIT_SHARED:
        g.set_memory_attributes(0, g.size, SHARED)
    convert(g, 2, PRIVATE)
    for call in (g.host_read, lambda off, n: g.host_write(off, bytes(n))):
        with pytest.raises(HostFault) as info:
            call(PS + 5, g.size)  # shared page 1, private page 2, ..., past EOF
        assert info.value.offset == 2 * PS
        with pytest.raises(HostFault) as info:
            call(3 * PS, g.size)  # shared up to EOF, then past it
        assert info.value.offset == g.size
    allocated = g.status()["allocated_bytes"]
    g.host_write(2 * PS + 1, b"")
    assert bytes(g.host_read(2 * PS + 7, 0)) == b""
    g.guest_write(3 * PS + 3, b"")
    assert g.status()["allocated_bytes"] == allocated, "an empty access uses no page"


@flagsets("mmap")
def test_fault_private(env, gmem):
    """fault_private: with MMAP but not INIT_SHARED every host access faults, the first byte already."""
    for pg in sample_pages(gmem):
        offset = pg * PS
        with pytest.raises(HostFault) as info:
            gmem.host_read(offset, 1)
        assert info.value.offset == offset
        with pytest.raises(HostFault):
            gmem.host_write(offset, b"\xff")
    assert bytes(gmem.guest_read(0, 1)) == b"\0", "the refused host write stored nothing"


@ALL_FLAGS
def test_file_size(env, gmem, flags):
    """file_size: the size is the creation size; the page size is the unit (st_blksize)."""
    status = gmem.status()
    assert gmem.size == status["size"] == env.size
    assert gmem.folio_size == status["page_size"] == gmem.backend.page_size == env.unit
    assert status["flags"] == gmem.flags
    assert status["backend"] == env.backend


@ALL_FLAGS
def test_fallocate(env, gmem, flags):
    """fallocate: allocate the whole file; unaligned offset or length is EINVAL; allocating at or past EOF
    is EINVAL; punching at or past EOF succeeds; punch then allocate again works."""
    g, size, unit = gmem, gmem.size, env.unit
    g.allocate(0, size)
    assert g.status()["allocated_bytes"] == size
    seed(g)
    for mode in (KEEP, KEEP | PUNCH):
        for offset, length in ((unit - 1, unit), (0, unit - 1), (1, unit), (0, 1), (unit, unit + 1)):
            expect_error(errno.EINVAL, g.fallocate, mode, offset, length, g=g)
        if env.huge:  # page aligned is not enough: the unit is the huge page
            for offset, length in ((PS, unit), (0, PS), (unit - PS, 2 * PS)):
                expect_error(errno.EINVAL, g.fallocate, mode, offset, length, g=g)
    for offset, length in ((size, unit), (size + unit, unit), (size - unit, 2 * unit), (0, size + unit)):
        expect_error(errno.EINVAL, g.allocate, offset, length, g=g)
    before = state(g)
    for offset, length in ((size, unit), (size + unit, unit), (size + 4 * unit, 8 * unit)):
        g.punch_hole(offset, length)
        assert state(g) == before, "a punch at or past EOF is a no-op"
    g.punch_hole(size - unit, 2 * unit)  # straddles EOF: the in-file part is punched
    assert g.status()["allocated_bytes"] == size - unit
    assert raw(g, size - PS, PS) == bytes(PS)
    g.punch_hole(0, unit)
    assert g.status()["allocated_bytes"] == size - 2 * unit
    g.allocate(0, unit)
    assert g.status()["allocated_bytes"] == size - unit
    assert bytes(g.guest_read(0, PS)) == bytes(PS), "memory allocated again starts from zero"


#: The mode words Linux 6.18's vfs_fallocate passes to the filesystem (swept on a real guest_memfd).
VFS_MODES = {0x0, 0x1, 0x3, 0x8, 0x10, 0x11, 0x20, 0x40, 0x41, 0x80}


@ALL_FLAGS
def test_fallocate_modes_in_vfs_order(env, gmem, flags):
    """Every mode word below 0x200: KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE work, all others EOPNOTSUPP; the
    VFS checks come first (EINVAL for a bad offset/length, EOPNOTSUPP for a mode it refuses, then EFBIG),
    then guest_memfd's (EOPNOTSUPP without KEEP_SIZE or with another bit, then alignment EINVAL)."""
    g, unit = gmem, env.unit
    seed(g)
    before = state(g)
    for mode in range(0x200):
        if mode not in (KEEP, KEEP | PUNCH):
            expect_error(errno.EOPNOTSUPP, g.fallocate, mode, 0, unit)
        # an offset + length past LOFF_MAX: EFBIG, unless the VFS already refused the mode
        vfs_err = errno.EFBIG if mode in VFS_MODES else errno.EOPNOTSUPP
        expect_error(vfs_err, g.fallocate, mode, LOFF_MAX, unit)
        # offset and length come before any mode check
        expect_error(errno.EINVAL, g.fallocate, mode, 0, 0)
        expect_error(errno.EINVAL, g.fallocate, mode, -unit, unit)
        # guest_memfd's own order: the mode before alignment
        if mode in VFS_MODES:
            expect_error(errno.EINVAL if mode in (KEEP, KEEP | PUNCH) else errno.EOPNOTSUPP,
                         g.fallocate, mode, 1, 1)
    assert state(g) == before, "refused fallocate calls change nothing"
    rows = [
        (KEEP, 0, -unit, errno.EINVAL),
        (KEEP, LOFF_MAX, 1, errno.EFBIG),           # EFBIG beats the unaligned length
        (KEEP, LOFF_MAX - 5, 1, errno.EINVAL),      # inside LOFF_MAX: alignment decides
        (KEEP, 1 << 62, 1 << 62, errno.EFBIG),      # the sum wraps a signed 64-bit offset
        (KEEP | PUNCH, 1 << 62, 1 << 62, errno.EFBIG),
        (KEEP, 1 << 62, unit, errno.EINVAL),        # allocation past EOF
        (0, LOFF_MAX, unit, errno.EFBIG),           # the VFS accepts mode 0, so EFBIG comes first
        (PUNCH, 0, unit, errno.EOPNOTSUPP),         # punch without keep_size
        (FALLOC_FL_COLLAPSE_RANGE | KEEP, LOFF_MAX, unit, errno.EOPNOTSUPP),
        (FALLOC_FL_INSERT_RANGE | KEEP, LOFF_MAX, unit, errno.EOPNOTSUPP),
        (FALLOC_FL_ZERO_RANGE | PUNCH | KEEP, LOFF_MAX, unit, errno.EOPNOTSUPP),
        (FALLOC_FL_ZERO_RANGE | KEEP, LOFF_MAX, unit, errno.EFBIG),
        (FALLOC_FL_UNSHARE_RANGE | KEEP, 0, unit, errno.EOPNOTSUPP),
        (0x100, 0, 0, errno.EINVAL),
    ]
    for mode, offset, length, err in rows:
        expect_error(err, g.fallocate, mode, offset, length, g=g)
    g.fallocate(KEEP | PUNCH, 1 << 62, unit)  # far past EOF: still a no-op success
    assert state(g) == before
    g.fallocate(KEEP, 0, unit)
    g.fallocate(KEEP | PUNCH, 0, unit)
    assert raw(g, 0, PS) == bytes(PS)





@ALL_FLAGS
def test_invalid_punch_hole(env, gmem, flags):
    """invalid_punch_hole: the ten (offset, length) pairs around the unit are all EINVAL, and change
    nothing. Offsets are 0, 1 or one unit; lengths 1 or the unit -1/+0/+1."""
    unit = env.unit
    seed(gmem)
    pairs = [(0, 1), (0, unit - 1), (0, unit + 1), (1, 1), (1, unit - 1), (1, unit), (1, unit + 1),
             (unit, 1), (unit, unit - 1), (unit, unit + 1)]
    assert len(pairs) == 10
    for offset, length in pairs:
        expect_error(errno.EINVAL, gmem.punch_hole, offset, length, g=gmem)
        expect_error(errno.EINVAL, gmem.allocate, offset, length, g=gmem)


# ======================================================================================================
# design §7.6.2 guest_memfd_conversions_test.c (v8)
# ======================================================================================================

def convert(g: GuestMemfd, pg: int, attributes: int, npages: int = 1) -> None:
    g.set_memory_attributes(pg * PS, npages * PS, attributes)


def check_private(g: GuestMemfd, pg: int, expect: int, write: int) -> None:
    """test_private: the host faults both ways; the guest reads ``expect`` and writes ``write``."""
    offset = pg * PS
    assert g.attribute_at(offset) == PRIVATE
    with pytest.raises(HostFault):
        g.host_write(offset, page(0xEE))
    assert bytes(g.guest_read(offset, PS)) == page(expect), "private content seen by the guest"
    g.guest_write(offset, page(write))
    with pytest.raises(HostFault):
        g.host_read(offset, 1)


def check_shared(g: GuestMemfd, pg: int, expect: int, host_value: int, write: int) -> None:
    """test_shared: the host reads ``expect`` and writes ``host_value``; the guest sees it and writes
    ``write``; the host sees that. Without MMAP the host faults and the guest does both steps."""
    offset = pg * PS
    assert g.attribute_at(offset) == SHARED
    if host_ok(g):
        assert bytes(g.host_read(offset, PS)) == page(expect), "shared content seen by the host"
        g.host_write(offset, page(host_value))
    else:
        with pytest.raises(HostFault):
            g.host_read(offset, 1)
        assert bytes(g.guest_read(offset, PS)) == page(expect)
        g.guest_write(offset, page(host_value))
    assert bytes(g.guest_read(offset, PS)) == page(host_value)
    g.guest_write(offset, page(write))
    if host_ok(g):
        assert bytes(g.host_read(offset, PS)) == page(write)


def initial(flags: int) -> int:
    return SHARED if flags & INIT_SHARED else PRIVATE


def flip(attributes: int) -> int:
    return SHARED if attributes == PRIVATE else PRIVATE


def check(g: GuestMemfd, pg: int, expect: int, new: int) -> None:
    """Check page ``pg`` holds ``expect`` under its current attribute and leave ``new`` in it."""
    if g.attribute_at(pg * PS) == PRIVATE:
        check_private(g, pg, expect, new)
    else:
        check_shared(g, pg, expect, 0x55, new)


@flagsets("none", "mmap")
def test_init_private(env, gmem):
    """init_private: private (0 → 'A'), converted to shared (reads 'A'), back to private (reads 'C')."""
    check_private(gmem, 0, 0, ord("A"))
    convert(gmem, 0, SHARED)
    check_shared(gmem, 0, ord("A"), ord("B"), ord("C"))
    convert(gmem, 0, PRIVATE)
    check_private(gmem, 0, ord("C"), ord("D"))


@flagsets("mmap+shared")
def test_init_shared(env, gmem):
    """init_shared: shared, then private, then shared; the value survives each step."""
    check_shared(gmem, 0, 0, ord("A"), ord("B"))
    convert(gmem, 0, PRIVATE)
    check_private(gmem, 0, ord("B"), ord("C"))
    convert(gmem, 0, SHARED)
    check_shared(gmem, 0, ord("C"), ord("D"), ord("E"))


@ALL_FLAGS
def test_indexing(env, gmem, flags):
    """indexing: converting one page of four leaves the others' attributes and values alone; the highest
    index goes first."""
    g, start = gmem, initial(flags)
    values = {pg: 0 for pg in range(4)}
    for test_page in reversed(range(4)):
        for pg in range(4):
            check(g, pg, values[pg], 0x10 * test_page + pg + 1)
            values[pg] = 0x10 * test_page + pg + 1
        convert(g, test_page, flip(start))
        for pg in range(4):
            want = flip(start) if pg == test_page else start
            assert g.attribute_at(pg * PS) == want, f"page {pg} after converting page {test_page}"
            check(g, pg, values[pg], values[pg] + 0x80)
            values[pg] += 0x80
        convert(g, test_page, start)
        for pg in range(4):
            check(g, pg, values[pg], values[pg] - 0x80)
            values[pg] -= 0x80
    assert g.get_attributes() == [(0, g.size, start)]


@flagsets("mmap+shared")
def test_before_allocation_shared(env, gmem):
    """before_allocation_shared: converting to private before any page exists works; the guest reads 0."""
    if not gmem.backend.preallocates:
        assert gmem.status()["allocated_bytes"] == 0
    convert(gmem, 0, PRIVATE)
    check_private(gmem, 0, 0, ord("A"))


@flagsets("none", "mmap")
def test_before_allocation_private(env, gmem):
    """before_allocation_private: converting to shared before allocation works; the host reads 0."""
    if not gmem.backend.preallocates:
        assert gmem.status()["allocated_bytes"] == 0
    convert(gmem, 0, SHARED)
    check_shared(gmem, 0, 0, ord("B"), ord("C"))


@ALL_FLAGS
def test_unallocated_folios(env, make, flags):
    """unallocated_folios: of 8 shared pages the test page and page 4 are touched; converting all 8 to
    private keeps 'A' in those and 0 in the rest; converting each back to shared shows the same."""
    for test_page in range(8):
        g = make(flags, max(8 * PS, env.unit))
        if not flags & INIT_SHARED:
            convert(g, 0, SHARED, 8)
        touched = {test_page, 4}
        for pg in touched:
            write_page(g, pg, ord("A"))
        convert(g, 0, PRIVATE, 8)
        for pg in range(8):
            want = ord("A") if pg in touched else 0
            assert bytes(g.guest_read(pg * PS, PS)) == page(want), f"page {pg} (test page {test_page})"
        for pg in range(8):
            convert(g, pg, SHARED)
            check_shared(g, pg, ord("A") if pg in touched else 0, ord("B"), ord("C"))
        g.close()


@ALL_FLAGS
def test_truncate(env, gmem, flags):
    """truncate: punching a shared page zeroes it and it stays shared; converted to private the guest sees
    the host's data; punched again it stays private and reads 0."""
    g, unit = gmem, env.unit
    if not flags & INIT_SHARED:
        convert(g, 0, SHARED)
    write_page(g, 0, ord("A"))
    g.punch_hole(0, unit)
    assert g.attribute_at(0) == SHARED, "punch-hole leaves the attribute alone"
    check_shared(g, 0, 0, ord("B"), ord("C"))
    convert(g, 0, PRIVATE)
    check_private(g, 0, ord("C"), ord("D"))
    g.punch_hole(0, unit)
    assert g.attribute_at(0) == PRIVATE, "punch-hole leaves the attribute alone"
    check_private(g, 0, 0, ord("E"))


class RecordingRevoker:
    """Stands in for every other process mapping the file: records what it is told to unmap, and checks
    what those processes would see meanwhile (reads fault, a dirty write-back is accepted)."""

    def __init__(self):
        self.calls: list[tuple[tuple[int, int], ...]] = []
        self.gmem: GuestMemfd | None = None
        self.write_back: dict[int, bytes] = {}
        self.fail_with: BaseException | None = None

    def __call__(self, ranges):
        self.calls.append(tuple((r.start, r.end) for r in ranges))
        g = self.gmem
        pending = g.pending
        if pending is not None and pending.kind == "to_private":
            for r in ranges:
                with pytest.raises(HostFault):
                    g.host_read(r.start, 1)
        for offset, data in self.write_back.items():
            g.host_write(offset, data)
        self.write_back = {}
        if self.fail_with is not None:
            raise self.fail_with


@flagsets("mmap+shared")
def test_forked_accesses(env, make, flags):
    """forked_accesses: shared→private revokes exactly the converted shared ranges from every mapping,
    before the attribute flips; afterwards any host access faults. Private→shared, no-ops, refused
    conversions and punches past EOF revoke nothing; a punch revokes the punched range."""
    revoker = RecordingRevoker()
    g = make(flags, revoker=revoker)
    revoker.gmem = g
    for pg in range(4):
        write_page(g, pg, pg + 1)

    convert(g, 2, PRIVATE)
    assert revoker.calls == [((2 * PS, 3 * PS),)]
    convert(g, 0, PRIVATE, 4)
    assert revoker.calls[-1] == ((0, 2 * PS), (3 * PS, 4 * PS)), "only the shared parts are revoked"
    for pg in range(4):
        with pytest.raises(HostFault):
            g.host_read(pg * PS, 1)
        with pytest.raises(HostFault):
            g.host_write(pg * PS, b"x")
        assert bytes(g.guest_read(pg * PS, PS)) == page(pg + 1), "conversion keeps the content"

    calls = len(revoker.calls)
    convert(g, 0, PRIVATE, 4)  # no-op
    convert(g, 0, SHARED, 4)   # private→shared: nothing is mapped, nothing to revoke
    g.pin(0, PS)
    expect_error(errno.EAGAIN, convert, g, 0, PRIVATE, 4)
    g.punch_hole(g.size + env.unit, env.unit)
    assert len(revoker.calls) == calls
    g.unpin(0, PS)

    # a dirty page written back during the revocation is kept
    revoker.write_back = {PS: page(0x77)}
    convert(g, 1, PRIVATE)
    assert bytes(g.guest_read(PS, PS)) == page(0x77), "write-back during revocation must not be lost"

    # a revocation that fails leaves everything as it was, and the next conversion works
    revoker.fail_with = OSError(errno.EINTR, "interrupted")
    before = state(g)
    with pytest.raises(OSError):
        convert(g, 0, PRIVATE)
    assert state(g) == before and g.pending is None
    revoker.fail_with = None
    convert(g, 0, PRIVATE)
    assert g.attribute_at(0) == PRIVATE

    g.punch_hole(0, env.unit)
    assert revoker.calls[-1] == ((0, env.unit),)
    g.punch_hole(g.size - env.unit, 3 * env.unit)
    assert revoker.calls[-1] == ((g.size - env.unit, g.size),), "punch revokes only the in-file part"


class RecordingLock:
    """A state lock that notes when it is taken and whether a transition is still pending when it is let go."""

    def __init__(self, log: list, gmem: GuestMemfd):
        self.log, self.gmem, self.held = log, gmem, False

    def __enter__(self):
        self.held = True
        self.log.append("lock")

    def __exit__(self, *exc):
        self.held = False
        self.log.append(("unlock", "pending" if self.gmem.pending is not None else "done"))


def test_the_one_runner_revokes_outside_the_lock_and_commits_under_it():
    """``GuestMemfd.run_transition`` is also what the FUSE server runs (``Transitions.run_transition``
    passes its revocation, its state lock and the punch's memory recount): the revocation runs without the lock (a
    real one waits for write-backs that take it); a failed one is aborted under the lock and re-raised,
    nothing changed and nothing counted; a commit runs under the lock, inside ``around_commit``, and
    counts the revocation."""
    g = GuestMemfd(4 * PS, MMAP | INIT_SHARED)
    log: list = []
    lock = RecordingLock(log, g)
    fail: list[BaseException] = [OSError(errno.EINTR, "interrupted")]

    def revoke(ranges):
        log.append(("revoke", tuple((r.start, r.end) for r in ranges), "locked" if lock.held else "unlocked"))
        if fail:
            raise fail.pop()

    def around_commit(transition, commit):
        log.append(("commit", transition.kind, "locked" if lock.held else "unlocked"))
        commit()

    def run(transition):
        g.run_transition(transition, revoke, lock=lock, around_commit=around_commit)

    with pytest.raises(OSError) as failed:
        run(g.prepare_set_memory_attributes(PS, PS, PRIVATE))
    assert failed.value.errno == errno.EINTR, "the revocation's own error comes back"
    assert log == [("revoke", ((PS, 2 * PS),), "unlocked"), "lock", ("unlock", "done")], "aborted under the lock"
    assert g.attribute_at(PS) == SHARED and g.counters.revocations == 0, "fail closed: nothing changed"

    log.clear()
    run(g.prepare_set_memory_attributes(PS, PS, PRIVATE))
    assert log == [("revoke", ((PS, 2 * PS),), "unlocked"), "lock", ("commit", "to_private", "locked"),
                   ("unlock", "done")]
    assert g.attribute_at(PS) == PRIVATE
    assert (g.counters.revocations, g.counters.revoked_bytes) == (1, PS)

    log.clear()
    run(g.prepare_fallocate(KEEP | PUNCH, 0, 2 * PS))
    assert log == [("revoke", ((0, 2 * PS),), "unlocked"), "lock", ("commit", "punch_hole", "locked"),
                   ("unlock", "done")]
    assert (g.counters.revocations, g.counters.revoked_bytes, g.counters.punches) == (2, 3 * PS, 1)
    g.close()


@flagsets("mmap", "mmap+shared")
def test_elevated_refcount(env, make, flags):
    """elevated_refcount: a pinned page makes a bulk conversion to private fail with EAGAIN and
    error_offset at that page; page by page only the pinned one fails; after unpinning the bulk
    conversion succeeds and every page kept its data."""
    for test_page in range(4):
        g = make(flags, env.unit if env.huge else 4 * PS)
        if not flags & INIT_SHARED:
            convert(g, 0, SHARED, 4)
        for pg in range(4):
            write_page(g, pg, 0x20 + pg)
        g.pin(test_page * PS, PS)
        err = expect_error(errno.EAGAIN, convert, g, 0, PRIVATE, 4, g=g)
        assert err.error_offset == test_page * PS
        for pg in range(4):
            if pg == test_page:
                err = expect_error(errno.EAGAIN, convert, g, pg, PRIVATE, g=g)
                assert err.error_offset == test_page * PS
            else:
                convert(g, pg, PRIVATE)
        g.unpin(test_page * PS, PS)
        convert(g, 0, PRIVATE, 4)
        assert g.get_attributes(0, 4 * PS) == [(0, 4 * PS, PRIVATE)]
        for pg in range(4):
            assert bytes(g.guest_read(pg * PS, PS)) == page(0x20 + pg), f"page {pg} kept its data"
        g.close()


# ======================================================================================================
# design §7.6.3 gaps: the ioctl's errno table, pins, zeroing, bookkeeping
# ======================================================================================================

def attribute_errors(size: int):
    """(why, kwargs, words the message must contain) rows, each EINVAL, in v8's validation order.
    Rows with several faults check that the earlier check wins."""
    return [
        ("flags", dict(offset=0, size=PS, attributes=PRIVATE, flags=1), "flags"),
        ("flags high bit", dict(offset=0, size=PS, attributes=PRIVATE, flags=1 << 63), "flags"),
        ("flags before reserved", dict(offset=0, size=PS, attributes=PRIVATE, flags=2, reserved=(1,)),
         "flags"),
        ("reserved", dict(offset=0, size=PS, attributes=PRIVATE, reserved=(0,) * 10 + (1,)), "reserved"),
        ("reserved before attributes", dict(offset=0, size=PS, attributes=1, reserved=(5,)), "reserved"),
        *[(f"attributes {a:#x}", dict(offset=0, size=PS, attributes=a), "attributes")
          for a in (1, 2, 4, 0x10, 0x9, 1 << 63, U64_MAX, -1)],
        ("attributes before size", dict(offset=0, size=0, attributes=1), "attributes"),
        ("size 0", dict(offset=0, size=0, attributes=PRIVATE), "empty"),
        ("size 0 before alignment", dict(offset=1, size=0, attributes=PRIVATE), "empty"),
        ("overflow", dict(offset=U64_MAX - PS + 1, size=2 * PS, attributes=PRIVATE), "wrapping"),
        ("overflow before alignment", dict(offset=U64_MAX, size=3, attributes=PRIVATE), "wrapping"),
        ("unaligned offset", dict(offset=1, size=PS, attributes=PRIVATE), "aligned"),
        ("unaligned size", dict(offset=0, size=PS + 1, attributes=PRIVATE), "aligned"),
        ("unaligned size small", dict(offset=0, size=1, attributes=SHARED), "aligned"),
        ("alignment before EOF", dict(offset=size + 1, size=PS, attributes=PRIVATE), "aligned"),
        ("offset at EOF", dict(offset=size, size=PS, attributes=PRIVATE), "past the end"),
        ("offset past EOF", dict(offset=size + PS, size=PS, attributes=SHARED), "past the end"),
        ("range past EOF", dict(offset=size - PS, size=2 * PS, attributes=PRIVATE), "past the end"),
        ("huge range past EOF", dict(offset=0, size=1 << 62, attributes=SHARED), "past the end"),
    ]


@ALL_FLAGS
def test_set_memory_attributes_errno_table(env, gmem, flags):
    """KVM_SET_MEMORY_ATTRIBUTES2's EINVAL table in v8 order; no error_offset; nothing changes."""
    g = gmem
    convert(g, 1, flip(initial(flags)))  # a mixed state, so that any stray change would show
    seed(g)
    for why, kwargs, words in attribute_errors(g.size):
        err = expect_error(errno.EINVAL, g.set_memory_attributes, g=g, **kwargs)
        assert words in err.detail, f"{why}: the message should name the check that failed: {err.detail!r}"
        assert err.error_offset is None, f"{why}: error_offset is only defined for EAGAIN/ENOMEM"


@flagsets("mmap", "mmap+shared")
def test_noop_conversion_on_pinned_page_succeeds(env, gmem, flags):
    """A request for the attribute a range already has returns at once: no reference check, so a pinned
    page is no obstacle; it counts as a no-op and revokes nothing."""
    g = gmem
    if not flags & INIT_SHARED:
        convert(g, 0, SHARED, 2)
    g.pin(0, PS)
    before = g.status()["conversions"]
    convert(g, 0, SHARED, 2)
    after = g.status()["conversions"]
    assert after["noop"] == before["noop"] + 1
    assert (after["to_private"], after["to_shared"]) == (before["to_private"], before["to_shared"])
    err = expect_error(errno.EAGAIN, convert, g, 0, PRIVATE, 2, g=g)
    assert err.error_offset == 0
    assert g.status()["conversions"]["eagain"] == before["eagain"] + 1


@ALL_FLAGS
def test_error_offset_only_on_failure(env, gmem, flags):
    """Success returns nothing and carries no error; EINVAL has no error_offset; EAGAIN has one."""
    g = gmem
    assert g.set_memory_attributes(0, PS, SHARED) is None
    assert g.set_memory_attributes(0, PS, PRIVATE) is None
    assert g.set_memory_attributes(0, PS, PRIVATE) is None  # no-op
    err = expect_error(errno.EINVAL, g.set_memory_attributes, 0, 0, PRIVATE)
    assert err.error_offset is None


@ALL_FLAGS
def test_punch_leaves_attributes(env, gmem, flags):
    """Punching a unit with mixed attributes zeroes it and keeps every page's attribute."""
    g, unit = gmem, env.unit
    convert(g, 1, flip(initial(flags)))
    convert(g, 3, flip(initial(flags)))
    seed(g)
    before = g.get_attributes()
    g.punch_hole(0, max(unit, 4 * PS))
    assert g.get_attributes() == before
    for pg in range(4):
        assert bytes(g.guest_read(pg * PS, PS)) == bytes(PS)


@ALL_FLAGS
def test_zero_on_first_use(env, gmem, flags):
    """A page reads zero the first time it is used (host, guest or fallocate), is zeroed only that once
    (allocating it again keeps the data), conversions never zero, and only a punch starts it over."""
    g, unit = gmem, env.unit
    pre = g.backend.preallocates
    assert g.status()["allocated_bytes"] == (g.size if pre else 0)
    assert bytes(g.guest_read(PS, PS)) == bytes(PS), "a never used page reads as zero"
    assert g.status()["allocated_bytes"] == (g.size if pre else unit), "first use allocates its folio"
    g.allocate(0, unit)
    assert bytes(g.guest_read(0, PS)) == bytes(PS), "allocated memory starts as zero"
    g.guest_write(0, page(0x42))
    g.allocate(0, g.size)
    assert bytes(g.guest_read(0, PS)) == page(0x42), "allocating again does not zero"
    convert(g, 0, flip(initial(flags)))
    convert(g, 0, initial(flags))
    assert bytes(g.guest_read(0, PS)) == page(0x42), "conversions do not zero"
    g.punch_hole(0, unit)
    assert g.status()["allocated_bytes"] == g.size - unit
    assert bytes(g.guest_read(0, PS)) == bytes(PS), "after a punch the page starts from zero again"


@flagsets("mmap", "mmap+shared")
def test_pins(env, gmem, flags):
    """pin/unpin: pins need shared pages (EFAULT at the first private one), nest, and unpinning a page
    that is not pinned is EINVAL; bad ranges are EINVAL; failures change nothing."""
    g, size = gmem, gmem.size
    if not flags & INIT_SHARED:
        convert(g, 0, SHARED, 4)
    convert(g, 2, PRIVATE)
    seed(g)
    err = expect_error(errno.EFAULT, g.pin, 0, 4 * PS, g=g)
    assert err.error_offset == 2 * PS, "error_offset names the first private page"
    for offset, length in ((1, PS), (0, PS + 1), (0, 0), (-PS, PS), (size - PS, 2 * PS), (size, PS)):
        expect_error(errno.EINVAL, g.pin, offset, length, g=g)
        expect_error(errno.EINVAL, g.unpin, offset, length, g=g)
    expect_error(errno.EINVAL, g.unpin, 0, PS, g=g)  # never pinned
    g.pin(0, 2 * PS)
    g.pin(PS, PS)
    assert g.status()["pinned_bytes"] == 2 * PS
    assert g.snapshot().pins.tolist() == [[0, PS, 1], [PS, PS, 2]]
    expect_error(errno.EINVAL, g.unpin, 0, 4 * PS, g=g)  # pages 2 and 3 are not pinned
    g.unpin(0, 2 * PS)
    assert g.snapshot().pins.tolist() == [[PS, PS, 1]]
    err = expect_error(errno.EAGAIN, convert, g, 0, PRIVATE, 2, g=g)
    assert err.error_offset == PS
    g.unpin(PS, PS)
    expect_error(errno.EINVAL, g.unpin, PS, PS, g=g)
    assert g.status()["pinned_bytes"] == 0
    convert(g, 0, PRIVATE, 2)


@flagsets("none")
def test_pin_needs_a_host_mapping(env, gmem):
    """Without MMAP there is no host mapping to pin, even of a shared page: EFAULT, nothing changes."""
    convert(gmem, 0, SHARED)
    err = expect_error(errno.EFAULT, gmem.pin, 0, PS, g=gmem)
    assert "mmap" in err.detail


def test_huge_folio_split_and_merge(env, make):
    """A huge folio is split while any of its pages is shared and merged once all are private again;
    status counts whole/split folios and split/merge events, the snapshot lists the split folios.
    Without huge pages there are no huge folios to count."""
    g = make(MMAP)
    g.allocate(0, g.size)
    folios, step = g.size // env.unit, env.unit // PS

    def observed():
        s = g.status()
        return s["huge_folios"], s["folio_splits"], s["folio_merges"], g.snapshot().split_folios.tolist()

    if not env.huge:
        convert(g, 1, SHARED)
        assert observed() == ({"whole": 0, "split": 0}, 0, 0, [])
        return
    assert observed() == ({"whole": folios, "split": 0}, 0, 0, [])
    convert(g, 1, SHARED)
    assert observed() == ({"whole": folios - 1, "split": 1}, 1, 0, [0])
    convert(g, 2, SHARED)  # the same folio: already split
    assert observed() == ({"whole": folios - 1, "split": 1}, 1, 0, [0])
    convert(g, 1, PRIVATE)  # page 2 is still shared
    assert observed() == ({"whole": folios - 1, "split": 1}, 1, 0, [0])
    convert(g, 2, PRIVATE)
    assert observed() == ({"whole": folios, "split": 0}, 1, 1, [])
    convert(g, step - 1, SHARED, 2)  # straddles the first folio boundary: splits two
    assert observed() == ({"whole": folios - 2, "split": 2}, 3, 1, [0, env.unit])
    convert(g, 0, SHARED, g.size // PS)
    assert observed() == ({"whole": 0, "split": folios}, 3 + folios - 2, 1,
                          [i * env.unit for i in range(folios)])
    convert(g, 0, PRIVATE, g.size // PS)
    assert observed() == ({"whole": folios, "split": 0}, 1 + folios, 1 + folios, [])


@pytest.mark.parametrize("unit", [SZ_2M, SZ_1G], ids=["2M", "1G"])
def test_huge_folio_bookkeeping_at_scale_on_sim(unit):
    """The same bookkeeping on the simulated backend with many folios (no real memory needed)."""
    if "sim" not in plugins.available(plugins.BACKENDS):
        pytest.skip("the sim backend is not installed")
    size = 64 * unit
    with GuestMemfd(size, MMAP, backend="sim", page_size=unit) as g:
        step = unit // PS
        for i in range(0, 64, 2):  # one shared page in every other folio
            g.set_memory_attributes(i * unit + 5 * PS, PS, SHARED)
        s = g.status()
        assert s["huge_folios"] == {"whole": 32, "split": 32} and s["folio_splits"] == 32
        assert g.snapshot().split_folios.tolist() == [i * unit for i in range(0, 64, 2)]
        g.set_memory_attributes(0, size, PRIVATE)
        s = g.status()
        assert s["huge_folios"] == {"whole": 64, "split": 0} and s["folio_merges"] == 32
        assert step == unit // PS


STATUS_KEYS = {
    "name", "size", "flags", "flag_names", "backend", "folio_size", "page_size", "allocated_bytes", "shared_bytes",
    "private_bytes", "pinned_bytes", "huge_folios", "conversions", "revocations", "revoked_bytes", "punches",
    "folio_splits", "folio_merges", "attribute_runs", "metadata_bytes", "backend_bytes", "backend_info",
}


@flagsets("mmap", "mmap+shared")
def test_status_fields(env, make, flags):
    """status: every field of design §2.2, consistent with the calls made, and JSON-serialisable."""
    g = make(flags, name="vm0")
    base = g.status()
    assert STATUS_KEYS <= set(base)
    assert base["name"] == "vm0"
    names = [n for n, bit in (("mmap", MMAP), ("init_shared", INIT_SHARED)) if g.flags & bit]
    assert base["flag_names"] == names
    start = initial(flags)
    if start == PRIVATE:
        convert(g, 0, SHARED, 4)
    convert(g, 0, PRIVATE, 2)          # 2 pages to private: one revocation of 2 pages
    convert(g, 0, PRIVATE, 2)          # no-op
    convert(g, 1, SHARED)              # to shared
    g.pin(PS, PS)
    expect_error(errno.EAGAIN, convert, g, 0, PRIVATE, 2)
    g.punch_hole(0, env.unit)
    s = g.status()
    json.loads(json.dumps(s))
    conv0 = base["conversions"]
    extra_shared = 1 if start == PRIVATE else 0
    assert s["conversions"] == {
        "to_private": conv0["to_private"] + 1, "noop": conv0["noop"] + 1,
        "to_shared": conv0["to_shared"] + 1 + extra_shared, "eagain": conv0["eagain"] + 1}
    assert s["revocations"] == base["revocations"] + 2          # the conversion and the punch
    assert s["revoked_bytes"] == base["revoked_bytes"] + 2 * PS + env.unit
    assert s["punches"] == base["punches"] + 1
    private = sum(n for _, n, a in g.get_attributes() if a == PRIVATE)
    assert (s["private_bytes"], s["shared_bytes"]) == (private, g.size - private)
    assert s["pinned_bytes"] == PS
    assert s["attribute_runs"] == len(g.get_attributes())
    assert s["metadata_bytes"] == g.metadata_bytes() > 0
    # the pin faulted page 1's folio in, the punch of the first unit took it out again (with 4K pages
    # page 1 lies outside that unit)
    allocated = g.size - env.unit if g.backend.preallocates else (0 if env.huge else PS)
    assert s["allocated_bytes"] == allocated
    assert isinstance(s["backend_bytes"], int) and s["backend_bytes"] >= 0
    assert isinstance(s["backend_info"], dict)
    assert s["folio_size"] == s["page_size"] == env.unit


@flagsets("mmap", "mmap+shared")
def test_snapshot_fields(env, make, flags):
    """snapshot: attribute runs, folio size, extents inside allocated memory, split folios, pins; frozen;
    and it survives a JSON round trip."""
    g = make(flags)
    g.allocate(0, g.size)
    if not flags & INIT_SHARED:
        convert(g, 0, SHARED, 4)
    convert(g, 1, PRIVATE)
    g.pin(2 * PS, PS)
    snap = g.snapshot(memslot=(1 << 32, 0, g.size))
    runs = g.get_attributes()
    assert snap.attr_starts.tolist() == [o for o, _, _ in runs]
    assert snap.attr_private.tolist() == [a == PRIVATE for _, _, a in runs]
    assert (snap.size, snap.flags, snap.backend, snap.folio_size) == (g.size, g.flags, env.backend, env.unit)
    assert snap.memslot == (1 << 32, 0, g.size)
    assert snap.pins.tolist() == [[2 * PS, PS, 1]]
    split = sorted({f * env.unit for o, n, a in runs if a == SHARED
                    for f in range(o // env.unit, -(-(o + n) // env.unit))}) if env.huge else []
    assert snap.split_folios.tolist() == split, "a huge folio is split where any of its pages is shared"
    ext = snap.extents
    if len(ext):
        assert (np.diff(ext[:, 0]) > 0).all(), "extents are sorted by offset"
        assert (ext[:-1, 0] + ext[:-1, 2] <= ext[1:, 0]).all(), "extents do not overlap"
        assert ext[0, 0] >= 0 and ext[-1, 0] + ext[-1, 2] <= g.size and (ext[:, 2] > 0).all()
    with pytest.raises(ValueError):
        snap.attr_starts[0] = 5  # read-only
    convert(g, 1, SHARED)
    assert snap.attr_private.tolist() == [a == PRIVATE for _, _, a in runs], "a snapshot is frozen"
    again = type(snap).from_json(snap.to_json())
    assert again.attr_starts.tolist() == snap.attr_starts.tolist()
    assert again.pins.tolist() == snap.pins.tolist() and again.memslot == snap.memslot


@flagsets("mmap+shared")
def test_transition_protocol(env, gmem):
    """prepare_* returns the change with the ranges to revoke; nothing flips before commit(); abort()
    leaves everything as it was; one transition at a time."""
    g = gmem
    for pg in range(4):
        write_page(g, pg, pg + 1)
    t = g.prepare_set_memory_attributes(0, 2 * PS, PRIVATE)
    assert t.kind == "to_private" and [(r.start, r.end) for r in t.revoke] == [(0, 2 * PS)]
    assert g.attribute_at(0) == SHARED, "nothing flips before commit"
    with pytest.raises(HostFault):
        g.host_read(0, 1)  # reads of the range already fail while it is revoked
    g.host_write(0, page(0x99))  # write-back of a dirty page is accepted
    with pytest.raises(RuntimeError):
        g.prepare_fallocate(KEEP | PUNCH, 0, env.unit)
    t.abort()
    assert g.pending is None and g.attribute_at(0) == SHARED
    assert bytes(g.host_read(PS, PS)) == page(2)
    t = g.prepare_set_memory_attributes(0, 2 * PS, PRIVATE)
    t.commit()
    assert g.get_attributes(0, 2 * PS) == [(0, 2 * PS, PRIVATE)]
    assert bytes(g.guest_read(0, PS)) == page(0x99)
    assert g.prepare_set_memory_attributes(0, 2 * PS, PRIVATE) is None, "no-op: nothing to do"
    assert g.prepare_set_memory_attributes(0, 2 * PS, SHARED) is None, "private→shared applies at once"
    assert g.attribute_at(0) == SHARED
    t = g.prepare_fallocate(KEEP | PUNCH, 0, env.unit)
    assert t.kind == "punch_hole" and [(r.start, r.end) for r in t.revoke] == [(0, env.unit)]
    t.commit()
    assert bytes(g.guest_read(0, PS)) == bytes(PS)
