"""Exporter ``arm64-tables``: real VMSAv8-64 stage-2 translation tables for the layout, in one binary blob.

The blob is an image meant to be loaded at physical address ``blob_base`` (0 unless a caller relocates
it): a 64-byte header padded to one granule, then the tables, each one granule long, table ``i`` at
``blob_base + granule * (1 + i)``; table 0 is the root. Header (little-endian)::

    0  magic "UFSGS2T\\0"     8  u16 version (1)   10  u16 header size (64)   12  u32 granule
    16 u8 start level        17 u8 levels        18  u8 IPA bits            19  u8 reserved
    20 u64 blob_base         28 u64 root PA      36  u32 table count        40  u32 reserved
    44 u64 descriptors written   (then zero padding to 64, and to the granule)

Descriptors (Arm ARM D8.3): table ``0b11`` at levels < 3; block ``0b01`` at levels 1–2; page ``0b11`` at
level 3. Leaf attributes: MemAttr[5:2] = 0b1111 (Normal, write-back), SH[9:8] = 0b11 (inner shareable),
AF[10] = 1, S2AP[7:6] from the row's permissions (0b11 read/write, 0b01 read-only), XN (bit 54) where
the row is not executable, i.e. shared memory; a contiguous-hint leaf is ``span`` descriptors of the
level's size with the Contiguous bit (52) set. The root is one full table at the start level (no
concatenated root tables), chosen as the shallowest level that covers the IPA space and every leaf.
"""

from __future__ import annotations

import errno
import struct

import numpy as np

from ufsgmem.errors import fail
from ufsgmem.exporter import LayoutExporter
from ufsgmem.layout import PERM_W, PERM_X

MAGIC = b"UFSGS2T\0"
HEADER = struct.Struct("<8sHHIBBBBQQIIQ")
HEADER_SIZE = 64
MAX_IPA_BITS = 48
#: The image is built in memory: refuse layouts whose leaf tables alone would pass 256 MiB.
MAX_DESCRIPTORS = 1 << 25

DESC_VALID, DESC_TABLE, DESC_PAGE, DESC_BLOCK = 1, 3, 3, 1
ATTR_MEMATTR_WB = 0xF << 2
ATTR_SH_INNER = 3 << 8
ATTR_AF = 1 << 10
S2AP_RO, S2AP_RW = 1 << 6, 3 << 6
CONTIGUOUS = 1 << 52
XN = 1 << 54


def geometry(granule: int) -> tuple[int, int]:
    """``(page shift, index bits per level)``: 4K → (12, 9), 16K → (14, 11), 64K → (16, 13)."""
    shift = granule.bit_length() - 1
    return shift, shift - 3


def level_span(granule: int, level: int) -> int:
    shift, bits = geometry(granule)
    return 1 << (shift + bits * (3 - level))


class Arm64TablesExporter(LayoutExporter):
    name = "arm64-tables"
    suffix = ".bin"

    def render(self, layout, snapshot) -> bytes:
        arch = layout.arch
        if arch.family != "arm64":
            raise fail(errno.EINVAL, f"arm64-tables needs an arm64 arch, not {arch.name}")
        return build_tables(layout)


def _descriptors(layout):
    """One row per hardware descriptor: address, output, level, attribute bits."""
    arch = layout.arch
    span = np.ones(len(layout), dtype=np.int64)
    for leaf in arch.leaves:
        span[layout.size == leaf.size] = leaf.span
    step = layout.size // span
    n = layout.count * span
    first = np.repeat(np.cumsum(n) - n, n)
    k = np.arange(int(n.sum()), dtype=np.int64) - first
    step_d = np.repeat(step, n)
    addr = np.repeat(layout.guest, n) + k * step_d
    out = np.repeat(layout.phys, n) + k * step_d
    perms = np.repeat(layout.perms, n).astype(np.int64)
    attrs = ATTR_MEMATTR_WB | ATTR_SH_INNER | ATTR_AF
    bits = np.where(perms & PERM_W, S2AP_RW, S2AP_RO) | np.where(perms & PERM_X, 0, XN) | attrs
    bits = bits | np.where(np.repeat(span, n) > 1, CONTIGUOUS, 0)
    return addr, out, np.repeat(layout.level, n).astype(np.int64), bits.astype(np.uint64)


def _start_level(granule: int, ipa_bits: int, min_leaf_level: int) -> int:
    _, bits = geometry(granule)
    for level in (3, 2, 1, 0):
        if level_span(granule, level) << bits >= 1 << ipa_bits:
            return min(level, min_leaf_level)
    return 0


def build_tables(layout, blob_base: int = 0) -> bytes:
    granule = layout.arch.granule
    _, bits = geometry(granule)
    entries = 1 << bits
    span = {leaf.size: leaf.span for leaf in layout.arch.leaves}
    wanted = int(sum(c * span[s] for s, c in layout.counts_by_size().items()))
    if wanted > MAX_DESCRIPTORS:
        raise fail(errno.EFBIG, f"{wanted} descriptors would make tables over "
                                f"{MAX_DESCRIPTORS * 8 >> 20} MiB; export a smaller memslot")
    addr, out, level, attrs = _descriptors(layout)
    end = int(layout.meta["memslot"]["guest_base"] + layout.meta["memslot"]["size"])
    ipa_bits = max(32, (max(end, 1) - 1).bit_length())
    if ipa_bits > MAX_IPA_BITS:
        raise fail(errno.EINVAL, f"guest addresses need {ipa_bits} IPA bits; the tables support {MAX_IPA_BITS}")
    start = _start_level(granule, ipa_bits, int(level.min()) if len(level) else 3)

    # tables per level: one per distinct (address // span of the level above) among deeper descriptors
    keys = {start: np.zeros(1, dtype=np.int64)}
    for lv in range(start + 1, 4):
        keys[lv] = np.unique(addr[level >= lv] // level_span(granule, lv - 1))
    first_id, total = {}, 0
    for lv in range(start, 4):
        first_id[lv], total = total, total + len(keys[lv])
    tables = np.zeros((total, entries), dtype=np.uint64)

    def table_of(lv: int, a: np.ndarray) -> np.ndarray:
        if lv == start:
            return np.zeros(len(a), dtype=np.int64)
        return first_id[lv] + np.searchsorted(keys[lv], a // level_span(granule, lv - 1))

    def index_of(lv: int, a: np.ndarray) -> np.ndarray:
        return (a // level_span(granule, lv)) & (entries - 1)

    for lv in range(start + 1, 4):  # table descriptors pointing at each level's tables
        child = keys[lv] * level_span(granule, lv - 1)
        pa = blob_base + granule * (1 + first_id[lv] + np.arange(len(child), dtype=np.int64))
        tables[table_of(lv - 1, child), index_of(lv - 1, child)] = (pa | DESC_TABLE).astype(np.uint64)
    for lv in range(start, 4):  # leaves
        sel = level == lv
        kind = DESC_PAGE if lv == 3 else DESC_BLOCK
        tables[table_of(lv, addr[sel]), index_of(lv, addr[sel])] = \
            (out[sel].astype(np.uint64) | attrs[sel] | np.uint64(kind))

    header = HEADER.pack(MAGIC, 1, HEADER_SIZE, granule, start, 4 - start, ipa_bits, 0, blob_base,
                         blob_base + granule, total, 0, len(addr))
    return header.ljust(granule, b"\0") + tables.astype("<u8").tobytes()


#: The plugin object the entry point names (an instance, so `load_exporter(...).export(...)` just works).
EXPORTER = Arm64TablesExporter()
