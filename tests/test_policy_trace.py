"""The trace format: every bad line is refused with its line number, good traces round-trip exactly."""

from __future__ import annotations

import io
import json

import pytest

from ufsgmem.policy.trace import FORMAT, Record, Trace, TraceError, dump, parse_lines
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

HEADER = json.dumps({"format": FORMAT, "name": "t", "description": "a test trace"})
CREATE = json.dumps({"op": "create", "size": "1M", "flags": ["mmap"]})


def lines(*records) -> list[str]:
    return [HEADER, CREATE] + [r if isinstance(r, str) else json.dumps(r) for r in records]


def test_a_valid_trace_parses_into_records():
    trace = parse_lines(lines(
        {"op": "convert", "offset": 0, "size": "8K", "to": "shared"},
        {"op": "touch", "offset": "0x1000", "size": 4096, "who": "host", "write": True},
        {"op": "pin", "offset": 0, "size": 4096},
        {"op": "unpin", "offset": 0, "size": 4096},
        {"op": "punch", "offset": "64K", "size": "64K"},
    ))
    assert (trace.name, trace.size, trace.flags, trace.page_size) == ("t", 1 << 20, GUEST_MEMFD_FLAG_MMAP, None)
    assert trace.records == [
        Record("convert", 0, 8192, "shared"), Record("touch", 4096, 4096, ("host", True)),
        Record("pin", 0, 4096), Record("unpin", 0, 4096), Record("punch", 65536, 65536),
    ]
    assert trace.counts() == {"convert": 1, "punch": 1, "pin": 1, "unpin": 1, "touch": 1}


def test_create_takes_integer_flags_and_a_page_size():
    create = json.dumps({"op": "create", "size": 4 << 20, "flags": 3, "page_size": "2M"})
    trace = parse_lines([HEADER, create])
    assert trace.flags == GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
    assert trace.page_size == 2 << 20 and trace.records == []


R = {"op": "convert", "offset": 0, "size": 4096, "to": "private"}

# (the lines after header and create, the line number the error must name, words the message must hold)
BAD_RECORDS = [
    (["{not json"], 3, "not JSON"),
    (["[1, 2]"], 3, "must be a JSON object"),
    ([{"op": "explode", "offset": 0, "size": 4096}], 3, "unknown op 'explode'"),
    ([{"offset": 0, "size": 4096}], 3, "unknown op None"),
    ([R, {"op": "convert", "offset": 0, "size": 4096}], 4, "convert needs field 'to'"),
    ([R, R, {**R, "colour": "red"}], 5, "unknown field 'colour'"),
    ([{**R, "to": "secret"}], 3, "'private' or 'shared'"),
    ([{**R, "offset": 100}], 3, "multiples of 4K"),
    ([{**R, "size": 0}], 3, "size must be positive"),
    ([{**R, "size": -4096}], 3, "negative"),
    ([{**R, "size": 1.5}], 3, "integer or a size string"),
    ([{**R, "size": True}], 3, "integer or a size string"),
    ([{**R, "offset": "lots"}], 3, "not a size"),
    ([{**R, "offset": "1020K", "size": "8K"}], 3, "runs past the end of the 1M file"),
    ([{"op": "touch", "offset": 0, "size": 4096, "who": "vcpu", "write": False}], 3, "'host' or 'guest'"),
    ([{"op": "touch", "offset": 0, "size": 4096, "who": "host", "write": 1}], 3, "true or false"),
    ([{"op": "pin", "offset": 0}], 3, "pin needs field 'size'"),
    ([R, ""], 4, "empty line"),
    ([R, {"op": "create", "size": 4096, "flags": 0}], 4, "second create"),
]


@pytest.mark.parametrize("records, line, words", BAD_RECORDS, ids=[b[2] for b in BAD_RECORDS])
def test_a_bad_record_names_its_line(records, line, words):
    with pytest.raises(TraceError) as info:
        parse_lines(lines(*records), where="bad.jsonl")
    assert info.value.line == line, str(info.value)
    assert str(info.value).startswith(f"bad.jsonl:{line}: ")
    assert words in str(info.value)


BAD_STARTS = [
    ([], 1, "empty trace"),
    ([json.dumps({"format": "other/9", "name": "x", "description": ""})], 1, "unknown trace format"),
    ([json.dumps({"format": FORMAT, "description": ""})], 1, "string 'name'"),
    ([json.dumps({"format": FORMAT, "name": "x", "description": 7})], 1, "string 'description'"),
    ([CREATE], 1, "must be the header"),
    (["17"], 1, "header must be a JSON object"),
    ([HEADER, json.dumps(R)], 2, "before create"),
    ([HEADER], 2, "never creates"),
    ([HEADER, json.dumps({"op": "create", "size": 5000, "flags": 0})], 2, "positive multiple of 4K"),
    ([HEADER, json.dumps({"op": "create", "size": 4096, "flags": ["mmap", "huge"]})], 2, "unknown flag 'huge'"),
    ([HEADER, json.dumps({"op": "create", "size": 4096, "flags": "mmap"})], 2, "list of names"),
    ([HEADER, json.dumps({"op": "create", "size": 4096, "flags": 0, "page_size": 3000})], 2, "power of two"),
    ([HEADER, json.dumps({"op": "create", "size": 4096})], 2, "create needs field 'flags'"),
]


@pytest.mark.parametrize("text, line, words", BAD_STARTS, ids=[b[2] for b in BAD_STARTS])
def test_a_bad_header_or_create_names_its_line(text, line, words):
    with pytest.raises(TraceError) as info:
        parse_lines(text)
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)


def test_dump_then_parse_gives_the_same_trace():
    trace = Trace(name="rt", description="round trip", size=1 << 30, flags=GUEST_MEMFD_FLAG_MMAP,
                  page_size=2 << 20, header={"workload": "hand", "seed": 3},
                  records=[Record("convert", 4096, 8192, "shared"), Record("touch", 0, 4096, ("guest", False)),
                           Record("pin", 4096, 4096), Record("unpin", 4096, 4096),
                           Record("punch", 0, 2 << 20)])
    out = io.StringIO()
    dump(trace, out)
    again = parse_lines(out.getvalue().splitlines())
    assert again == trace


def test_unknown_flag_bits_survive_a_round_trip():
    """The format keeps what the guest asked for; refusing bad flags is the core's job at create."""
    trace = Trace(name="f", description="", size=4096, flags=0x10, page_size=None, records=[])
    out = io.StringIO()
    dump(trace, out)
    assert parse_lines(out.getvalue().splitlines()).flags == 0x10
