"""Address types, half-open ranges, alignment helpers and size parsing.

Three kinds of number describe memory here and must never be mixed up (vm-memory keeps GPAs and region
offsets apart the same way):

* ``FileOffset`` — a byte offset into a guest_memfd file (what the control protocol speaks);
* ``GuestAddress`` — a guest physical address (only exists once a memslot binds the file);
* ``PhysAddress`` — a host physical address (from ``/proc/self/pagemap`` or a simulated allocator).

They are ``typing.NewType`` over ``int``: free at run time on the hot paths, and a type checker refuses to
pass one where another is expected. ``PageIndex`` is a file offset divided by the base page size.

Every range in ufsgmem is half-open, ``[start, end)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NewType

from .uapi import PAGE_SHIFT, PAGE_SIZE

FileOffset = NewType("FileOffset", int)
GuestAddress = NewType("GuestAddress", int)
PhysAddress = NewType("PhysAddress", int)
PageIndex = NewType("PageIndex", int)

U64_MAX = (1 << 64) - 1


def page_index(offset: FileOffset) -> PageIndex:
    return PageIndex(offset >> PAGE_SHIFT)


def page_offset(index: PageIndex) -> FileOffset:
    return FileOffset(index << PAGE_SHIFT)


def is_aligned(value: int, alignment: int = PAGE_SIZE) -> bool:
    return value & (alignment - 1) == 0


def align_down(value: int, alignment: int) -> int:
    return value & ~(alignment - 1)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass(frozen=True, slots=True)
class Range:
    """A half-open byte range ``[start, end)`` of a file."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError(f"range end {self.end:#x} is below its start {self.start:#x}")

    @classmethod
    def of(cls, offset: int, size: int) -> "Range":
        return cls(offset, offset + size)

    @property
    def size(self) -> int:
        return self.end - self.start

    def __contains__(self, offset: int) -> bool:
        return self.start <= offset < self.end

    def intersect(self, other: "Range") -> "Range | None":
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Range(start, end) if start < end else None

    def __str__(self) -> str:
        return f"[{self.start:#x}, {self.end:#x})"


_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``4096``, ``0x1000``, ``4K``, ``2M``, ``1G``, ``1T`` (binary multiples) into bytes.

    Raises ``ValueError`` with the offending text; the control protocol turns that into EINVAL.
    """
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use decimal, 0x hex, or a K/M/G/T suffix)")
    number, suffix = match.groups()
    value = int(number, 16) if number[:2] in ("0x", "0X") else int(number, 10)  # "010" is ten, not octal
    return value * _SUFFIX[suffix.upper()]


def format_size(size: int) -> str:
    """The shortest exact form: ``2M``, ``1G``, ``12K``, or plain bytes."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIX[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
