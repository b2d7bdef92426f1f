"""Read the kernel column of a generated ``docs/compat.md`` back into record entries.

This is how the first record was seeded: the last run on a kernel with guest_memfd left no record, only
the page it generated (Linux 6.18.44, 2026-11-29), whose kernel column shows each observation the way
:func:`.report.render` prints it: a dict as ``key: `value``` items joined by ``<br>``, any other
observation as its text, and ``|`` escaped as ``\\|``. That printing is reversible for observations
whose values hold no backtick and no ``<br>``; an item that does not read back is left out and the entry
lists the keys that did (``known_keys``), and a case missing from the page gets no observation
(``unrecovered``). Nothing is guessed.

    python -m ufsgmem.conformance.transcribe PAGE --release R --date D --source TEXT [--note TEXT]... -o FILE

The tests also use it to read a fresh page back and check that its kernel column is the record.
"""

from __future__ import annotations

import argparse
import re
import sys

from .cases import CASES
from .record import Entry, Record

_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_ITEM = re.compile(r"^(.*): `([^`]*)`$")


def _unescape(cell: str) -> str:
    return cell.replace("\\|", "|").strip()


def rows(page: str) -> dict[str, list[str]]:
    """Case name -> the cells of its row in the page's case table (unescaped)."""
    out = {}
    for line in page.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [_unescape(c) for c in _CELL_SPLIT.split(line.strip())[1:-1]]
        out[cells[0].strip("`")] = cells
    return out


def observation(cell: str) -> Entry:
    """One kernel cell back into an entry: whole, partial (known_keys) or unrecovered."""
    if "`" not in cell:  # printed as its text: an n/a note, or any other string observation
        return Entry(cell)
    items = cell.split("<br>")
    known = {}
    for item in items:
        m = _ITEM.match(item)
        if m and m.group(1) not in known:
            known[m.group(1)] = m.group(2)
    if not known:
        return Entry(None, unrecovered=f"the cell does not read back as an observation: {cell!r}")
    return Entry(known, None if len(known) == len(items) else tuple(known))


def kernel_column(page: str, column: int = 2) -> dict[str, Entry]:
    """An entry for every case of the suite, from the page's kernel column (cells index ``column``)."""
    table = rows(page)
    return {case.name: observation(table[case.name][column]) if case.name in table else
            Entry(None, unrecovered="the case is not in the transcribed page")
            for case in CASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.conformance.transcribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("page", help="a generated compat.md ('-' for stdin)")
    parser.add_argument("--release", required=True)
    parser.add_argument("--date", required=True)
    parser.add_argument("--machine", default="x86_64")
    parser.add_argument("--source", required=True, help="where the page came from (kept in the record)")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--capability", action="append", default=[], metavar="NAME=VALUE|unknown")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)
    page = sys.stdin.read() if args.page == "-" else open(args.page).read()
    capabilities = {}
    for item in args.capability:
        key, _, value = item.partition("=")
        capabilities[key] = None if value == "unknown" else int(value, 0)
    entries = kernel_column(page)
    partial = [n for n, e in entries.items() if e.known_keys is not None]
    missing = [n for n, e in entries.items() if e.observation is None]
    notes = list(args.note)
    notes.append(f"{len(entries) - len(partial) - len(missing)} of {len(entries)} cases read back whole; "
                 f"partial: {partial or 'none'}; unrecovered: {missing or 'none'}")
    Record(args.release, args.date, args.machine, capabilities,
           {"method": "transcribed", "source": args.source, "notes": notes}, entries).save(args.output)
    print(notes[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
