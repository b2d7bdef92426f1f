"""The policy-workbench trace format: JSON lines, one header and then one record per line.

A trace is what a guest and its VMM did to one guest_memfd file, independent of how the memory is
allocated, so the same trace can be replayed against every backend and policy and the results compared.

Line 1 is the header::

    {"format": "ufsgmem-trace/1", "name": "cc-1T", "description": "...", ...}

``name`` and ``description`` are strings; any other header key (``workload``, ``seed``, ``params``) is
kept as information. Every following line is one record, an object with an ``op`` and its fields:

=========  ==========================================  =====================================================
op         fields                                      what it replays
=========  ==========================================  =====================================================
create     size, flags, page_size (optional)           KVM_CREATE_GUEST_MEMFD; the first record, exactly once
convert    offset, size, to (``private``|``shared``)   KVM_SET_MEMORY_ATTRIBUTES2
punch      offset, size                                fallocate(KEEP_SIZE|PUNCH_HOLE)
pin        offset, size                                an emulated long-term pin (a device's GUP pin)
unpin      offset, size                                drop that pin
touch      offset, size, who (``host``|``guest``),      an access: first use allocates; a host access to a
           write (bool)                                private page is a fault (SIGBUS)
=========  ==========================================  =====================================================

Sizes and offsets are integers or size strings (``"4K"``, ``"0x1000"``, ``"1T"``); ``flags`` is an integer
or a list of names (``["mmap", "init_shared"]``). Offsets and sizes must be multiples of 4 KiB, sizes
positive and every range inside the created file: the format only describes what the *guest* asked for.
Whether a request succeeds (a punch that is not aligned to a 1 GiB folio, a conversion of a pinned page)
depends on the backend and policy, so such requests are valid trace records and are counted as errors
when replayed.

Validation is strict and complete before anything is replayed: an unknown op or field, a missing or
mistyped field, or a range past the end gives :class:`TraceError` naming the file and line number.
Ranges are half-open, ``[offset, offset + size)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Iterable, NamedTuple

from ..address import format_size, parse_size
from ..uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE

FORMAT = "ufsgmem-trace/1"

#: op → (required fields, optional fields); ``op`` itself is implied.
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "create": (("size", "flags"), ("page_size",)),
    "convert": (("offset", "size", "to"), ()),
    "punch": (("offset", "size"), ()),
    "pin": (("offset", "size"), ()),
    "unpin": (("offset", "size"), ()),
    "touch": (("offset", "size", "who", "write"), ()),
}
OPS = tuple(FIELDS)
FLAG_BITS = {"mmap": GUEST_MEMFD_FLAG_MMAP, "init_shared": GUEST_MEMFD_FLAG_INIT_SHARED}


class TraceError(ValueError):
    """A trace line that is not valid; the message starts with ``FILE:LINE:``."""

    def __init__(self, where: str, line: int, detail: str):
        super().__init__(f"{where}:{line}: {detail}")
        self.where = where
        self.line = line
        self.detail = detail


class Record(NamedTuple):
    """One validated record. ``arg`` is ``to`` (convert), ``(who, write)`` (touch), else None."""

    op: str
    offset: int
    size: int
    arg: object = None


@dataclass
class Trace:
    """A validated trace: name, description, the create parameters and the records after create.

    ``header`` holds the header's other keys (``workload``, ``seed``, ``params``...).
    """

    name: str
    description: str
    size: int
    flags: int
    page_size: int | None
    records: list[Record]
    header: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def counts(self) -> dict[str, int]:
        """Records per op (create excluded)."""
        out = {op: 0 for op in OPS if op != "create"}
        for record in self.records:
            out[record.op] += 1
        return out


# --- parsing ---------------------------------------------------------------------------------------
def _size_field(obj: dict, key: str, fail) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        fail(f"{key} must be an integer or a size string, not {value!r}")
    try:
        number = parse_size(value)
    except ValueError as exc:
        fail(f"{key}: {exc}")
    if number < 0:
        fail(f"{key} {number} is negative")
    return number


def _flags_field(obj: dict, fail) -> int:
    value = obj["flags"]
    if isinstance(value, bool):
        fail(f"flags must be an integer or a list of names, not {value!r}")
    if isinstance(value, int):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fail(f"flags must be an integer or a list of names ({', '.join(FLAG_BITS)}), not {value!r}")
    unknown = [v for v in value if v not in FLAG_BITS]
    if unknown:
        fail(f"unknown flag {unknown[0]!r} (known: {', '.join(FLAG_BITS)})")
    bits = 0
    for name in value:
        bits |= FLAG_BITS[name]
    return bits


def _check_fields(obj: dict, op: str, fail) -> None:
    required, optional = FIELDS[op]
    missing = [k for k in required if k not in obj]
    if missing:
        fail(f"{op} needs field {missing[0]!r} (fields: {', '.join(required + optional)})")
    unknown = sorted(set(obj) - set(required) - set(optional) - {"op"})
    if unknown:
        fail(f"{op} has unknown field {unknown[0]!r} (fields: {', '.join(required + optional)})")


def _parse_range(obj: dict, op: str, file_size: int, fail) -> tuple[int, int]:
    offset, size = _size_field(obj, "offset", fail), _size_field(obj, "size", fail)
    if size == 0:
        fail(f"{op} size must be positive")
    if offset % PAGE_SIZE or size % PAGE_SIZE:
        fail(f"{op} offset {offset:#x} and size {size:#x} must be multiples of 4K")
    if offset + size > file_size:
        fail(f"{op} [{offset:#x}, {offset + size:#x}) runs past the end of the "
             f"{format_size(file_size)} file")
    return offset, size


def _parse_record(obj: dict, op: str, file_size: int, fail) -> Record:
    offset, size = _parse_range(obj, op, file_size, fail)
    if op == "convert":
        if obj["to"] not in ("private", "shared"):
            fail(f"convert to must be 'private' or 'shared', not {obj['to']!r}")
        return Record(op, offset, size, obj["to"])
    if op == "touch":
        if obj["who"] not in ("host", "guest"):
            fail(f"touch who must be 'host' or 'guest', not {obj['who']!r}")
        if not isinstance(obj["write"], bool):
            fail(f"touch write must be true or false, not {obj['write']!r}")
        return Record(op, offset, size, (obj["who"], obj["write"]))
    return Record(op, offset, size)


def _parse_header(obj, fail) -> dict:
    if not isinstance(obj, dict):
        fail("the header must be a JSON object")
    if "op" in obj:
        fail(f"line 1 must be the header ({{\"format\": \"{FORMAT}\", ...}}), not a record")
    if obj.get("format") != FORMAT:
        fail(f"unknown trace format {obj.get('format')!r} (this is {FORMAT!r})")
    for key in ("name", "description"):
        if not isinstance(obj.get(key), str):
            fail(f"the header needs a string {key!r}")
    return obj


def _parse_create(obj: dict, fail) -> tuple[int, int, int | None]:
    size = _size_field(obj, "size", fail)
    if size == 0 or size % PAGE_SIZE:
        fail(f"create size {size:#x} must be a positive multiple of 4K")
    flags = _flags_field(obj, fail)
    page_size = _size_field(obj, "page_size", fail) if obj.get("page_size") is not None else None
    if page_size is not None and (page_size < PAGE_SIZE or page_size & (page_size - 1)):
        fail(f"create page_size {page_size} must be a power of two of at least 4K")
    return size, flags, page_size


def parse_lines(lines: Iterable[str], where: str = "<trace>") -> Trace:
    """Validate every line and return the :class:`Trace`; TraceError names the first bad line."""
    header, create, records = None, None, []
    number = 0
    for number, text in enumerate(lines, start=1):
        def fail(detail: str, _n=number):
            raise TraceError(where, _n, detail)

        if not text.strip():
            fail("empty line")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"not JSON: {exc.msg} at column {exc.colno}")
        if header is None:
            header = _parse_header(obj, fail)
            continue
        if not isinstance(obj, dict):
            fail(f"a record must be a JSON object, not {type(obj).__name__}")
        op = obj.get("op")
        if op not in FIELDS:
            fail(f"unknown op {op!r} (ops: {', '.join(OPS)})")
        _check_fields(obj, op, fail)
        if op == "create":
            if create is not None:
                fail("a trace creates its file once; this is a second create")
            create = _parse_create(obj, fail)
        elif create is None:
            fail(f"{op} before create: the first record must create the file")
        else:
            records.append(_parse_record(obj, op, create[0], fail))
    if header is None:
        raise TraceError(where, 1, "empty trace: line 1 must be the header")
    if create is None:
        raise TraceError(where, number + 1, "the trace never creates its file")
    size, flags, page_size = create
    extra = {k: v for k, v in header.items() if k not in ("format", "name", "description")}
    return Trace(name=header["name"], description=header["description"], size=size, flags=flags,
                 page_size=page_size, records=records, header=extra)


def load(path: str) -> Trace:
    with open(path) as f:
        return parse_lines(f, where=str(path))


# --- writing ---------------------------------------------------------------------------------------
def record_dict(record: Record) -> dict:
    out = {"op": record.op, "offset": record.offset, "size": record.size}
    if record.op == "convert":
        out["to"] = record.arg
    elif record.op == "touch":
        out["who"], out["write"] = record.arg
    return out


def dump(trace: Trace, out: IO[str]) -> None:
    """Write ``trace`` as JSON lines (compact: one short line per record)."""
    header = {"format": FORMAT, **{k: v for k, v in trace.header.items() if k != "format"},
              "name": trace.name, "description": trace.description}
    names = [n for n, bit in FLAG_BITS.items() if trace.flags & bit]
    known = sum(FLAG_BITS[n] for n in names)
    create = {"op": "create", "size": trace.size, "flags": names if known == trace.flags else trace.flags}
    if trace.page_size is not None:
        create["page_size"] = trace.page_size
    out.write(json.dumps(header) + "\n")
    out.write(json.dumps(create) + "\n")
    for record in trace.records:
        out.write(json.dumps(record_dict(record), separators=(",", ":")) + "\n")


def save(trace: Trace, path: str) -> None:
    with open(path, "w") as f:
        dump(trace, f)
