"""A frozen snapshot of one guest_memfd's state: everything an exporter may look at, nothing it may change.

Exporters must be pure and deterministic, and at 1 TiB with 100 000 attribute runs they must be fast, so
the snapshot holds read-only numpy arrays rather than lists of objects:

* ``attr_starts`` (int64 byte offsets) and ``attr_private`` (bool): attribute run ``i`` covers
  ``[attr_starts[i], attr_starts[i+1])`` (the last one ends at ``size``); adjacent runs differ.
* ``extents`` (int64, shape (n, 3)): allocated memory as ``(offset, phys, size)`` rows, sorted by offset,
  coalesced where file and physical contiguity agree. Unallocated memory has no row.
* ``folio_size``: the backend's allocation unit (4 KiB, or 2 MiB / 1 GiB for huge pages).
* ``split_folios`` (int64): start offsets of allocated huge folios that are split (some page shared).
  Every other allocated, folio-aligned block is a whole folio.
* ``pins`` (int64, shape (n, 3)): ``(offset, size, count)`` of pinned ranges.
* ``memslot``: optional ``(guest_base, offset, size)``: guest physical ``guest_base`` maps file ``offset``.

All offsets and sizes are bytes; all ranges half-open. ``to_json``/``from_json`` save and load it, so a
layout can be computed from a saved snapshot without a mount.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np

from .pagedtext import PagedText, bool_column, int_column, rows_column


def _frozen(values, shape_tail=()) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64).reshape((-1, *shape_tail)) if shape_tail else np.asarray(values)
    arr = np.array(arr, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Snapshot:
    size: int
    flags: int
    backend: str
    folio_size: int
    attr_starts: np.ndarray
    attr_private: np.ndarray
    extents: np.ndarray
    split_folios: np.ndarray
    pins: np.ndarray
    memslot: tuple[int, int, int] | None = None
    page_size: int = 4096
    meta: dict = field(default_factory=dict)

    @classmethod
    def build(cls, *, size, flags, backend, folio_size, attr_starts, attr_private, extents=(),
              split_folios=(), pins=(), memslot=None, meta=None) -> "Snapshot":
        """Make a snapshot from plain sequences (copies them into read-only arrays)."""
        return cls(
            size=int(size), flags=int(flags), backend=str(backend), folio_size=int(folio_size),
            attr_starts=_frozen(np.asarray(attr_starts, dtype=np.int64)),
            attr_private=_frozen(np.asarray(attr_private, dtype=bool)),
            extents=_frozen(extents, (3,)),
            split_folios=_frozen(np.asarray(split_folios, dtype=np.int64)),
            pins=_frozen(pins, (3,)),
            memslot=tuple(int(v) for v in memslot) if memslot is not None else None,
            meta=dict(meta or {}),
        )

    def with_memslot(self, guest_base: int, offset: int = 0, size: int | None = None) -> "Snapshot":
        """The same state bound into a memslot at guest physical ``guest_base``."""
        size = self.size - offset if size is None else size
        return replace(self, memslot=(int(guest_base), int(offset), int(size)))

    # --- convenience views --------------------------------------------------------------------------
    def attr_runs(self) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(start, end, private)`` for each attribute run."""
        ends = np.append(self.attr_starts[1:], self.size)
        for start, end, private in zip(self.attr_starts.tolist(), ends.tolist(), self.attr_private.tolist()):
            yield start, end, private

    def attr_ends(self) -> np.ndarray:
        return np.append(self.attr_starts[1:], self.size)

    def is_private(self, offset: int) -> bool:
        i = int(np.searchsorted(self.attr_starts, offset, side="right")) - 1
        return bool(self.attr_private[i])

    def metadata_bytes(self) -> int:
        return int(self.attr_starts.nbytes + self.attr_private.nbytes)

    # --- persistence --------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "format": "ufsgmem-snapshot/1",
            "size": self.size, "flags": self.flags, "backend": self.backend,
            "folio_size": self.folio_size, "page_size": self.page_size,
            "attr_starts": self.attr_starts.tolist(), "attr_private": self.attr_private.tolist(),
            "extents": self.extents.tolist(), "split_folios": self.split_folios.tolist(),
            "pins": self.pins.tolist(), "memslot": self.memslot, "meta": self.meta,
        })

    def json_text(self) -> PagedText:
        """Exactly the bytes of :meth:`to_json`, rendered a block at a time as they are read, from this
        snapshot's arrays (the server holds an open ``snapshot`` file's content this way: ``pagedtext.py``)."""
        def scalar(key: str, value, first: bool = False) -> bytes:
            return (b"" if first else b", ") + f"{json.dumps(key)}: {json.dumps(value)}".encode("ascii")

        def column(key: str, col) -> list:
            return [f", {json.dumps(key)}: [".encode("ascii"), col, b"]"]

        return PagedText([
            b"{", scalar("format", "ufsgmem-snapshot/1", first=True), scalar("size", self.size),
            scalar("flags", self.flags), scalar("backend", self.backend), scalar("folio_size", self.folio_size),
            scalar("page_size", self.page_size),
            *column("attr_starts", int_column(self.attr_starts)),
            *column("attr_private", bool_column(self.attr_private)),
            *column("extents", rows_column(self.extents.reshape(-1, 3))),
            *column("split_folios", int_column(self.split_folios)),
            *column("pins", rows_column(self.pins.reshape(-1, 3))),
            scalar("memslot", self.memslot), scalar("meta", self.meta), b"}",
        ])

    @classmethod
    def from_json(cls, text: str) -> "Snapshot":
        data = json.loads(text)
        if data.get("format") != "ufsgmem-snapshot/1":
            raise ValueError(f"not a ufsgmem snapshot (format {data.get('format')!r})")
        return cls.build(
            size=data["size"], flags=data["flags"], backend=data["backend"], folio_size=data["folio_size"],
            attr_starts=data["attr_starts"], attr_private=data["attr_private"], extents=data["extents"],
            split_folios=data["split_folios"], pins=data["pins"], memslot=data["memslot"],
            meta=data.get("meta"),
        )
