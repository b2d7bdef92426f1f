"""The :class:`Layout`: an immutable stage-2 layout, stored as runs of equal leaves.

A row is ``count`` adjacent leaves of ``size`` bytes starting at guest address ``guest``, backed by
physical ``[phys, phys + size * count)``, all with one ``attribute``, ``level`` and ``perms``. Storing runs
instead of single leaves keeps a 1 TiB guest with 100 000 holes at a few hundred thousand rows even where
the kvm view needs fifty million 4 KiB leaves; :meth:`Layout.leaves` expands them when a caller wants
one row per leaf (small layouts, the table writer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from .arch import Arch
from .segments import ATTRIBUTE_NAMES, PRIVATE, SHARED

PERM_R, PERM_W, PERM_X = 1, 2, 4
PERMS_SHARED = PERM_R | PERM_W  # shared memory: read/write, never executable (the host writes it)
PERMS_GUEST = PERM_R | PERM_W | PERM_X  # private and mixed memory: the guest's own, executable


def perms_name(perms: int) -> str:
    return "".join(ch if perms & bit else "-" for ch, bit in (("r", PERM_R), ("w", PERM_W), ("x", PERM_X)))


class Leaf(NamedTuple):
    guest: int
    phys: int
    size: int
    level: int
    attribute: str
    perms: str


def _frozen(arr: np.ndarray, dtype) -> np.ndarray:
    arr = np.ascontiguousarray(arr, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Layout:
    view: str
    arch: Arch
    guest: np.ndarray
    phys: np.ndarray
    size: np.ndarray
    count: np.ndarray
    attribute: np.ndarray  # SHARED=0, PRIVATE=1, MIXED=2
    level: np.ndarray
    perms: np.ndarray
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_runs(cls, view: str, arch: Arch, runs: dict[str, np.ndarray], meta: dict) -> "Layout":
        size, attribute = runs["size"], runs["attribute"]
        level = np.zeros(len(size), dtype=np.int8)
        for leaf in arch.leaves:
            level[size == leaf.size] = leaf.level
        perms = np.where(attribute == SHARED, PERMS_SHARED, PERMS_GUEST)
        return cls(view, arch, _frozen(runs["guest"], np.int64), _frozen(runs["phys"], np.int64),
                   _frozen(size, np.int64), _frozen(runs["count"], np.int64), _frozen(attribute, np.int8),
                   _frozen(level, np.int8), _frozen(perms, np.uint8), dict(meta))

    # --- sizes and counts ---------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of rows (runs of equal leaves), not leaves: see :attr:`leaf_count`."""
        return len(self.guest)

    @property
    def bytes(self) -> np.ndarray:
        """Bytes each row covers."""
        return self.size * self.count

    @property
    def leaf_count(self) -> int:
        return int(self.count.sum())

    @property
    def mapped_bytes(self) -> int:
        return int(self.bytes.sum())

    def counts_by_size(self) -> dict[int, int]:
        """Leaf size in bytes -> number of leaves of that size (sizes with no leaf left out)."""
        return self._counts(self.size)

    def counts_by_level(self) -> dict[int, int]:
        """Lookup level -> number of leaves at that level (contiguous runs count once, at their level)."""
        return self._counts(self.level)

    def counts_by_attribute(self) -> dict[str, int]:
        return {ATTRIBUTE_NAMES[k]: v for k, v in self._counts(self.attribute).items()}

    def _counts(self, key: np.ndarray) -> dict[int, int]:
        keys, inverse = np.unique(key, return_inverse=True)
        totals = np.bincount(inverse.ravel(), weights=self.count, minlength=len(keys)) if len(keys) else []
        return {int(k): int(t) for k, t in zip(keys, totals) if t}

    # --- one row per leaf ---------------------------------------------------------------------------
    def expanded(self) -> dict[str, np.ndarray]:
        """Arrays with one entry per leaf (``guest``, ``phys``, ``size``, ``level``, ``attribute``, ``perms``)."""
        rep = self.count
        first = np.repeat(np.cumsum(rep) - rep, rep)
        k = np.arange(int(rep.sum()), dtype=np.int64) - first
        size = np.repeat(self.size, rep)
        return {"guest": np.repeat(self.guest, rep) + k * size, "phys": np.repeat(self.phys, rep) + k * size,
                "size": size, "level": np.repeat(self.level, rep),
                "attribute": np.repeat(self.attribute, rep), "perms": np.repeat(self.perms, rep)}

    def leaves(self) -> Iterator[Leaf]:
        """Every leaf in guest-address order (expands runs: meant for small layouts)."""
        for g, p, s, c, lv, a, pm in zip(self.guest.tolist(), self.phys.tolist(), self.size.tolist(),
                                          self.count.tolist(), self.level.tolist(), self.attribute.tolist(),
                                          self.perms.tolist()):
            for k in range(c):
                yield Leaf(g + k * s, p + k * s, s, lv, ATTRIBUTE_NAMES[a], perms_name(pm))

    def summary(self) -> dict:
        return {"view": self.view, "arch": self.arch.name, "granule": self.arch.granule,
                "leaves": self.leaf_count, "rows": len(self), "mapped_bytes": self.mapped_bytes,
                "counts_by_size": self.counts_by_size(), "counts_by_level": self.counts_by_level(),
                "counts_by_attribute": self.counts_by_attribute(), **self.meta}


__all__ = ["Layout", "Leaf", "PERM_R", "PERM_W", "PERM_X", "PERMS_SHARED", "PERMS_GUEST", "perms_name",
           "PRIVATE", "SHARED"]
