"""The documented deviations: where ufsgmem (or the in-process core) may observe something the kernel does
not, and why. Nothing else may differ.

Each entry names a case and, where only part of its observation differs, the keys that may differ; the
other keys must still agree. An entry whose case *agrees* is an error too (the list would be stale), so
this file can only ever describe the current behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    reason: str
    keys: tuple[str, ...] | None = None  # None: the whole observation may differ


HUGE_SIZES = Deviation(
    "the kernel allocates nothing at creation and has no upper bound; a ufsgmem backend maps the whole file "
    "into the server's address space at creation, so a size beyond the 128 TiB user address space is ENOMEM",
    keys=("0x4000000000000000", "0x7ffffffffffff000"))

#: Deviations of the in-process core, which has no file: only rules it models are compared.
CORE: dict[str, Deviation] = {
    "create_huge_sizes": HUGE_SIZES,
}

#: Deviations of a ufsgmem mount (filled from what the FUSE layer can and cannot do).
MOUNT: dict[str, Deviation] = {}

BY_SUBJECT = {"core": CORE, "ufsgmem": MOUNT}
