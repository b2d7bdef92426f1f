"""Stage-2 leaf sizes per architecture: which block sizes exist, at which level, and which are contiguous runs.

Every architecture here has a chain of leaf sizes in which each size divides the next (a *nested* chain).
That is what makes the greedy "largest aligned block that is allowed" tiling provably minimal (see
:mod:`ufsgmem.layout.tiling`), so :class:`Arch` refuses a chain that is not nested.

A *contiguous-hint* size (arm64's Contiguous bit) is not a descriptor of its own: it is ``span`` adjacent
descriptors of the level below, aligned and physically contiguous, with the bit set, which the TLB may
cache as one entry. The layout counts such a run as one leaf of the hinted size, because that is what the
hint buys; the ``arm64-tables`` exporter writes the ``span`` descriptors.

Levels follow each architecture's own numbering: x86 uses KVM's ``PG_LEVEL_4K/2M/1G`` = 1/2/3; arm64 uses
the VMSAv8-64 lookup level of the descriptor (3 for pages, 2 and 1 for blocks).

The granule (the smallest leaf) of arm64-16k and arm64-64k is larger than ufsgmem's 4 KiB page; see
``docs/layout.md`` for what a granule whose 4 KiB pages disagree becomes in each view.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..address import format_size
from ..errors import fail

SZ_4K, SZ_16K, SZ_64K = 4 << 10, 16 << 10, 64 << 10
SZ_2M, SZ_32M, SZ_512M = 2 << 20, 32 << 20, 512 << 20
SZ_1G, SZ_16G = 1 << 30, 16 << 30


@dataclass(frozen=True)
class LeafSize:
    """One leaf size: ``size`` bytes, written at lookup ``level``; ``span`` > 1 marks a contiguous hint."""

    size: int
    level: int
    span: int = 1

    @property
    def contiguous(self) -> bool:
        return self.span > 1

    @property
    def descriptor_size(self) -> int:
        """Size covered by each descriptor the hardware walks (the hinted leaf's base entry)."""
        return self.size // self.span


@dataclass(frozen=True)
class Arch:
    """An architecture's stage-2 leaf sizes, smallest (the granule) first."""

    name: str
    leaves: tuple[LeafSize, ...]
    family: str = "x86"  # "x86" | "arm64" (arm64 has real translation tables in arm64-tables)

    def __post_init__(self) -> None:
        sizes = [leaf.size for leaf in self.leaves]
        if not sizes or any(s & (s - 1) or s < SZ_4K for s in sizes):
            raise ValueError(f"arch {self.name}: leaf sizes must be powers of two >= 4K, got {sizes}")
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"arch {self.name}: leaf sizes must grow strictly, got {sizes}")

    @property
    def granule(self) -> int:
        return self.leaves[0].size

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(leaf.size for leaf in self.leaves)

    @property
    def max_size(self) -> int:
        return self.leaves[-1].size

    def leaf(self, size: int) -> LeafSize:
        for leaf in self.leaves:
            if leaf.size == size:
                return leaf
        raise KeyError(f"{self.name} has no {format_size(size)} leaf")

    def largest_at_most(self, limit: int) -> int:
        """The largest leaf size <= ``limit`` (the granule if even that is larger)."""
        best = self.granule
        for size in self.sizes:
            if size <= limit:
                best = size
        return best

    def largest_dividing(self, value: int) -> int:
        """The largest leaf size that divides ``value`` (0 if not even the granule does)."""
        best = 0
        for size in self.sizes:
            if value % size == 0:
                best = size
        return best

    def __str__(self) -> str:
        parts = [format_size(l.size) + ("*" if l.contiguous else "") for l in self.leaves]
        return f"{self.name} ({'/'.join(parts)}; * = contiguous hint)"


def _arch(name: str, family: str, *leaves: tuple[int, int, int]) -> Arch:
    return Arch(name, tuple(LeafSize(size, level, span) for size, level, span in leaves), family)


#: The architectures every exporter understands, by the name users pass as ``--arch``.
ARCHES: dict[str, Arch] = {
    "x86_64": _arch("x86_64", "x86", (SZ_4K, 1, 1), (SZ_2M, 2, 1), (SZ_1G, 3, 1)),
    "arm64-4k": _arch("arm64-4k", "arm64", (SZ_4K, 3, 1), (SZ_64K, 3, 16), (SZ_2M, 2, 1),
                      (SZ_32M, 2, 16), (SZ_1G, 1, 1)),
    "arm64-16k": _arch("arm64-16k", "arm64", (SZ_16K, 3, 1), (SZ_2M, 3, 128), (SZ_32M, 2, 1),
                       (SZ_1G, 2, 32)),
    "arm64-64k": _arch("arm64-64k", "arm64", (SZ_64K, 3, 1), (SZ_2M, 3, 32), (SZ_512M, 2, 1),
                       (SZ_16G, 2, 32)),
}


def get_arch(arch: "str | Arch") -> Arch:
    """The :class:`Arch` named ``arch`` (or ``arch`` itself); EINVAL listing the names otherwise."""
    if isinstance(arch, Arch):
        return arch
    try:
        return ARCHES[arch]
    except (KeyError, TypeError):
        raise fail(errno.EINVAL, f"unknown arch {arch!r}; available: {', '.join(ARCHES)}") from None
