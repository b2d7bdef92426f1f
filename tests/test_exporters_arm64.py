"""arm64-tables: walk the emitted stage-2 tables with an independent walker and compare every 4 KiB page
with the ground truth (phys address, mapped or not per the view's rule, S2AP/XN per attribute)."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from layout_model import PAGE, Model, Pages
from ufsgmem.errors import GuestMemfdError
from ufsgmem.plugins import export
from ufsgmem.layout import ARCHES, compute_layout

CONTIG_SPAN = {(4096, 3): 16, (4096, 2): 16, (16384, 3): 128, (16384, 2): 32, (65536, 3): 32, (65536, 2): 32}


class Walker:
    """Reads the blob the way an MMU would, one descriptor at a time (Arm ARM D8 stage-2 formats)."""

    def __init__(self, blob: bytes):
        magic, version, hsize, granule, start, levels, ipa, _, base, root, ntables, _, ndesc = \
            struct.unpack_from("<8sHHIBBBBQQIIQ", blob)
        assert magic == b"UFSGS2T\0" and version == 1 and hsize == 64
        assert start + levels == 4 and len(blob) == granule * (1 + ntables)
        self.blob, self.granule, self.start, self.base, self.root, self.ipa = blob, granule, start, base, root, ipa
        self.shift = granule.bit_length() - 1
        self.bits = self.shift - 3

    def desc(self, table_pa: int, index: int) -> int:
        off = table_pa - self.base + index * 8
        assert self.granule <= off < len(self.blob), f"descriptor outside the blob at {table_pa:#x}"
        return int.from_bytes(self.blob[off:off + 8], "little")

    def walk(self, addr: int):
        """``(pa, desc, level)`` for a mapped address, None for a fault."""
        assert addr < 1 << self.ipa
        table, level = self.root, self.start
        while True:
            lshift = self.shift + self.bits * (3 - level)
            d = self.desc(table, (addr >> lshift) & ((1 << self.bits) - 1))
            if not d & 1:
                return None
            oa = d & ((1 << 48) - 1) & ~((1 << lshift) - 1)
            if level == 3:
                assert d & 3 == 3, "level 3 needs a page descriptor"
                return oa | (addr & ((1 << lshift) - 1)), d, level
            if d & 3 == 3:
                table, level = d & ((1 << 48) - 1) & ~((1 << self.shift) - 1), level + 1
                continue
            assert (self.granule, level) in {(4096, 1), (4096, 2), (16384, 2), (65536, 2)}, \
                f"no block descriptor at level {level} for a {self.granule} granule"
            return oa | (addr & ((1 << lshift) - 1)), d, level


def check_tables(pages: Pages, view: str, arch_name: str) -> Walker:
    arch = ARCHES[arch_name]
    blob = export("arm64-tables", pages.snapshot(), view=view, arch=arch_name)
    walker, model = Walker(blob), Model(pages, view, arch)
    mappable = model.mappable()
    hinted = {leaf.guest + k for leaf in compute_layout(pages.snapshot(), view, arch).leaves()
              if arch.leaf(leaf.size).contiguous for k in range(0, leaf.size, PAGE)}
    flagged = set()
    gb, off, sz = pages.memslot or (0, 0, pages.npages * PAGE)
    for f in range(off // PAGE, (off + sz) // PAGE):
        guest = gb + f * PAGE - off
        got = walker.walk(guest)
        granule = guest // arch.granule * arch.granule
        if granule not in mappable:
            assert got is None, f"{view}: page {guest:#x} must not be mapped"
            continue
        assert got is not None, f"{view}: page {guest:#x} must be mapped"
        pa, d, level = got
        assert pa == pages.phys[f], f"page {guest:#x} translates to {pa:#x}, not {pages.phys[f]:#x}"
        label = model.label(granule, arch.granule)
        assert (d >> 2) & 0xF == 0xF and (d >> 8) & 3 == 3 and d >> 10 & 1, "WB normal, inner shareable, AF"
        assert (d >> 6) & 3 == 3, "S2AP read/write"
        if view == "guest":  # a guest-view leaf may be mixed (executable); only all-shared leaves are XN
            assert not (d >> 54 & 1) or pages.private[f] == 0, "private memory is never execute-never"
        else:
            assert bool(d >> 54 & 1) == (label == "shared"), "shared memory is execute-never, private is not"
        if d >> 52 & 1:
            flagged.add(guest)
            check_contiguous(walker, guest, level)
    assert flagged == hinted, "the Contiguous bit marks exactly the layout's contiguous-hint leaves"
    return walker


def check_contiguous(walker: Walker, addr: int, level: int) -> None:
    """Every entry of an aligned contiguous group is valid, flagged, same attributes, output contiguous."""
    span = CONTIG_SPAN[(walker.granule, level)]
    entry = 1 << (walker.shift + walker.bits * (3 - level))
    first = addr // (entry * span) * (entry * span)
    pa0, d0, _ = walker.walk(first)
    assert pa0 % (entry * span) == 0, "a contiguous group's output must be aligned to the group"
    for k in range(span):
        pa, d, lv = walker.walk(first + k * entry)
        assert lv == level and d >> 52 & 1 and pa == pa0 + k * entry
        assert d & ~((1 << 48) - 1) == d0 & ~((1 << 48) - 1) and d & 0xFFC == d0 & 0xFFC


def random_pages(seed: int, npages: int, folio: int) -> Pages:
    rnd = random.Random(seed)
    private = np.ones(npages, dtype=bool)
    for _ in range(8):
        s = rnd.randrange(npages)
        private[s:s + rnd.choice([1, 3, 16, 200])] = False
    phys = (1 << 32) + np.arange(npages, dtype=np.int64) * PAGE
    cut = rnd.randrange(npages)
    phys[cut:] += rnd.choice([PAGE, 2 << 20, 64 << 10])
    phys[rnd.randrange(npages):][:rnd.randrange(64)] = -1
    fpages = folio // PAGE
    split = np.zeros(npages, dtype=bool)
    for b in range(0, npages, fpages):
        split[b:b + fpages] = fpages > 1 and (~private[b:b + fpages]).any()
    return Pages(private, phys, folio, split)


@pytest.mark.parametrize("view", ["guest", "shared", "kvm"])
@pytest.mark.parametrize("arch", ["arm64-4k", "arm64-16k", "arm64-64k"])
def test_walk_every_page(arch, view):
    npages = 16384 if arch == "arm64-64k" else 8192  # 64 MiB / 32 MiB: every block level is reachable
    for seed, folio in ((1, 2 << 20), (2, 4096)):
        check_tables(random_pages(seed, npages, folio), view, arch)


def test_memslot_high_in_the_ipa_space():
    pages = random_pages(3, 1024, 2 << 20)
    pages.memslot = (1 << 40, 0, 1024 * PAGE)  # guest 1 TiB: start level 0 on a 4K granule
    walker = check_tables(pages, "kvm", "arm64-4k")
    assert walker.start == 0


def test_a_1g_block_is_one_level1_descriptor():
    n = 1 << 18
    pages = Pages(np.ones(n, dtype=bool), (1 << 32) + np.arange(n, dtype=np.int64) * PAGE, 1 << 30,
                  np.zeros(n, dtype=bool))
    blob = export("arm64-tables", pages.snapshot(), view="guest", arch="arm64-4k")
    walker = Walker(blob)
    pa, d, level = walker.walk(12345 * PAGE)
    assert (pa, level, d & 3) == ((1 << 32) + 12345 * PAGE, 1, 1)
    assert struct.unpack_from("<Q", blob, 44)[0] == 1, "one descriptor written"


def test_x86_is_refused():
    pages = random_pages(4, 64, 4096)
    with pytest.raises(GuestMemfdError, match="arm64 arch"):
        export("arm64-tables", pages.snapshot(), view="guest", arch="x86_64")


def test_too_many_descriptors_is_efbig_not_an_oom():
    import errno as _errno
    from layout_model import tib_snapshot
    with pytest.raises(GuestMemfdError) as exc:
        export("arm64-tables", tib_snapshot(), view="kvm", arch="arm64-4k")
    assert exc.value.errno == _errno.EFBIG and "smaller memslot" in str(exc.value)
    blob = export("arm64-tables", tib_snapshot(), view="guest", arch="arm64-4k")
    assert struct.unpack_from("<Q", blob, 44)[0] == 1024, "the guest view is 1024 1G blocks"
