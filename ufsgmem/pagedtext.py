"""Long text results rendered a block at a time as they are read, from compact arrays. Pure: no FUSE, no I/O.

Why: a ``get_attributes`` result or a ``snapshot`` of a fragmented file is long (400 000 attribute runs
are ~7-10 MB of text), and a reader may keep its file open indefinitely. Held as a Python string, each
such result cost the server about 12 MB until its handle closed. Here the server holds only the numbers
the text is made of, as numpy arrays (8 bytes a run boundary and 1 a flag, instead of ~25 bytes of
text), plus a small index, and renders the bytes a ``read`` asks for when it asks: what one result holds
is its arrays, its index and at most one rendered block (the last one read, so sequential reads of any
size render each block once).

A :class:`PagedText` is a sequence of pieces: fixed bytes, and :class:`Column`\\ s, each the text of ``n``
elements joined by a separator. A column knows every element's length in advance (computed from the
numbers with numpy when it is made, then dropped), and keeps the byte offset of every ``BLOCK``-th
element, so any offset maps to its block in O(log n) and a block renders in O(BLOCK). The text is ASCII
(byte offsets are character offsets). Slicing (``text[a:b]``) returns bytes, so a holder can treat it like
the ``bytes`` it replaces.

The renderers here produce exactly what ``json.dumps`` and ``ufsgmem.protocol`` produce for the same values (the
tests compare them at random offsets), so a reader cannot tell the difference.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Sequence

import numpy as np

#: elements per rendered block: a block of the widest elements here (extent rows) is < 20 KiB
BLOCK = 256

_P10 = np.array([10 ** k for k in range(1, 20)], dtype=np.uint64)
_P16 = np.array([16 ** k for k in range(1, 16)], dtype=np.uint64)


def decimal_lengths(values: np.ndarray) -> np.ndarray:
    """``len(str(v))`` for each int64 ``v``, vectorised."""
    values = np.asarray(values, dtype=np.int64)
    magnitude = np.abs(values).view(np.uint64)  # abs(INT64_MIN) wraps to 2**63, which is its magnitude
    return 1 + np.searchsorted(_P10, magnitude, side="right").astype(np.int64) + (values < 0)


def hex_lengths(values: np.ndarray) -> np.ndarray:
    """``len(f"{v:#x}")`` for each non-negative int64 ``v``, vectorised."""
    magnitude = np.asarray(values, dtype=np.int64).view(np.uint64)
    return 3 + np.searchsorted(_P16, magnitude, side="right").astype(np.int64)


class Column:
    """``n`` elements joined by ``sep``; ``render(i, j)`` gives elements ``[i, j)`` joined (no leading
    separator); ``lengths`` each element's length in bytes (used here, not kept). ``arrays`` are what the
    renderer reads: counted by :meth:`held_bytes`."""

    __slots__ = ("n", "sep", "render", "arrays", "offsets", "length", "widest")

    def __init__(self, n: int, lengths: np.ndarray, sep: bytes, render: Callable[[int, int], str],
                 arrays: Sequence[np.ndarray] = ()):
        self.n, self.sep, self.render, self.arrays = n, sep, render, tuple(arrays)
        if n == 0:
            self.offsets = np.zeros(1, dtype=np.int64)
            self.length = self.widest = 0
            return
        lengths = np.asarray(lengths, dtype=np.int64)
        # element k of block b > 0 is preceded by a separator that belongs to its block
        ends = np.cumsum(lengths + len(sep)) - len(sep)  # where element k's text ends
        starts = np.arange(0, n, BLOCK)
        offsets = np.empty(len(starts) + 1, dtype=np.int64)
        offsets[0] = 0
        offsets[1:] = ends[np.minimum(starts + BLOCK, n) - 1]
        self.offsets = offsets
        self.length = int(offsets[-1])
        self.widest = int(np.max(np.diff(offsets)))

    def block(self, b: int) -> bytes:
        i, j = b * BLOCK, min(self.n, (b + 1) * BLOCK)
        text = self.render(i, j).encode("ascii")
        return self.sep + text if b else text

    def held_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays) + self.offsets.nbytes


class PagedText:
    """Text made of fixed bytes and :class:`Column` pieces, rendered when read; ``len()`` is its length
    in bytes, ``text[a:b]`` the bytes there (a slice with step 1 only)."""

    def __init__(self, pieces: Sequence[bytes | Column]):
        self.pieces = [p for p in pieces if (p.length if isinstance(p, Column) else len(p))]
        self.starts: list[int] = []
        total = 0
        for piece in self.pieces:
            self.starts.append(total)
            total += piece.length if isinstance(piece, Column) else len(piece)
        self.length = total
        self._cached: tuple[int, int, bytes] | None = None  # (piece, block, bytes): one block, the last read

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, where: slice) -> bytes:
        if not isinstance(where, slice) or where.step not in (None, 1):
            raise TypeError("PagedText is read by slices: text[a:b]")
        start, stop, _ = where.indices(self.length)
        return self.read(start, stop - start)

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end, none past it)."""
        end = min(self.length, offset + max(size, 0))
        out, pos = [], max(offset, 0)
        while pos < end:
            p = bisect_right(self.starts, pos) - 1
            piece, local = self.pieces[p], pos - self.starts[p]
            if isinstance(piece, Column):
                b = int(np.searchsorted(piece.offsets, local, side="right")) - 1
                text = self._block(p, b, piece)
                local -= int(piece.offsets[b])
            else:
                text = piece
            chunk = text[local:local + end - pos]
            out.append(chunk)
            pos += len(chunk)
        return b"".join(out)

    def _block(self, p: int, b: int, column: Column) -> bytes:
        cached = self._cached  # one read of an attribute: safe against a concurrent reader's swap
        if cached is not None and cached[0] == p and cached[1] == b:
            return cached[2]
        text = column.block(b)
        self._cached = (p, b, text)
        return text

    def held_bytes(self) -> int:
        """What this result holds in the server at most: its arrays and indexes, its fixed pieces and the
        widest block it may cache."""
        fixed = sum(len(p) for p in self.pieces if not isinstance(p, Column))
        columns = [p for p in self.pieces if isinstance(p, Column)]
        arrays = {id(a): a.nbytes for c in columns for a in c.arrays}  # a column may share another's array
        return (fixed + sum(arrays.values()) + sum(c.offsets.nbytes for c in columns)
                + max((c.widest for c in columns), default=0))


# --- columns of the renderings ufsgmem uses ----------------------------------------------------------------
def int_column(values: np.ndarray) -> Column:
    """Decimal integers joined by ``", "``: the inside of a JSON list of ints."""
    values = np.asarray(values, dtype=np.int64)
    return Column(len(values), decimal_lengths(values), b", ",
                  lambda i, j: ", ".join(map(str, values[i:j].tolist())), (values,))


def bool_column(values: np.ndarray) -> Column:
    """``true``/``false`` joined by ``", "``: the inside of a JSON list of booleans."""
    values = np.asarray(values, dtype=bool)
    return Column(len(values), np.where(values, 4, 5), b", ",
                  lambda i, j: ", ".join("true" if v else "false" for v in values[i:j].tolist()), (values,))


def rows_column(rows: np.ndarray) -> Column:
    """Rows of integers as JSON lists joined by ``", "``: the inside of a JSON list of lists of ints."""
    rows = np.asarray(rows, dtype=np.int64)
    width = rows.shape[1] if rows.ndim == 2 else 0
    lengths = 2 + 2 * max(width - 1, 0) + decimal_lengths(rows).reshape(len(rows), width).sum(axis=1)

    def render(i: int, j: int) -> str:
        return ", ".join("[" + ", ".join(map(str, row)) + "]" for row in rows[i:j].tolist())

    return Column(len(rows), lengths, b", ", render, (rows,))
