"""Export the stage-2 (S2) layout of a guest_memfd file, or of a saved snapshot.

SOURCE is either a file on a ufsgmem mount (MOUNTPOINT/NAME: its state is read from MOUNTPOINT/NAME/snapshot)
or a snapshot saved as JSON (Snapshot.to_json(), e.g. `cat MOUNTPOINT/NAME/snapshot > vm0.json`).

Views: guest (everything the guest reaches, in the largest blocks physical contiguity allows), shared
(shared memory only: the host's or an IOMMU's table), kvm (KVM's rule: one attribute per block, whole
folios, memslot alignment). Arches: x86_64, arm64-4k, arm64-16k, arm64-64k. Exporters: text (default, to
stdout), json, png (needs -o), arm64-tables (binary, needs -o), or any installed exporter plugin.
--memslot binds the file at guest physical GPA (from file OFFSET, default 0); without it guest
address = file offset. See docs/layout.md.

examples:
  ufsgmem layout /mnt/gmem/vm0
  ufsgmem layout /mnt/gmem/vm0 --view kvm --arch arm64-4k --exporter json -o vm0-kvm.json
  ufsgmem layout vm0-snapshot.json --exporter png -o vm0.png --memslot 0x100000000
"""

from __future__ import annotations

import errno
import os
import sys

from ..address import parse_size
from ..errors import fail
from ..plugins import export
from ..layout import ARCHES, VIEWS
from ..snapshot import Snapshot

HELP = "export the stage-2 layout (text, json, png, arm64-tables)"

BINARY = ("png", "arm64-tables")


def configure(parser) -> None:
    parser.add_argument("source", metavar="MOUNTPOINT/NAME|SNAPSHOT.json",
                        help="a guest_memfd file on a ufsgmem mount, or a saved snapshot")
    parser.add_argument("--view", choices=VIEWS, default="guest", help="which table (default guest)")
    parser.add_argument("--arch", choices=list(ARCHES), default="x86_64", help="architecture (default x86_64)")
    parser.add_argument("--exporter", default="text", help="exporter plugin (default text)")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    parser.add_argument("--memslot", metavar="GPA[:OFFSET]",
                        help="bind the file at guest physical GPA, from file OFFSET (default 0)")


def load_snapshot(source: str) -> Snapshot:
    """The snapshot of a mounted file (SOURCE/snapshot) or a saved one (SOURCE itself)."""
    path = os.path.join(source, "snapshot") if os.path.isdir(source) else source
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except FileNotFoundError:
        what = "has no snapshot file (is it a ufsgmem mount?)" if path != source else "does not exist"
        raise fail(errno.ENOENT, f"{source} {what}") from None
    try:
        return Snapshot.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise fail(errno.EINVAL, f"{path} is not a ufsgmem snapshot: {exc}") from None


def parse_memslot(text: str, snapshot: Snapshot) -> Snapshot:
    gpa, _, offset = text.partition(":")
    try:
        gpa, offset = parse_size(gpa), parse_size(offset) if offset else 0
    except ValueError as exc:
        raise fail(errno.EINVAL, f"--memslot {text!r}: {exc}") from None
    if not 0 <= offset < snapshot.size:
        raise fail(errno.EINVAL, f"--memslot offset {offset:#x} is outside the {snapshot.size:#x}-byte file")
    return snapshot.with_memslot(gpa, offset)


def run(args) -> int:
    if args.exporter in BINARY and not args.output:
        print(f"ufsgmem layout: the {args.exporter} exporter writes binary data: give -o FILE", file=sys.stderr)
        return 2
    snapshot = load_snapshot(args.source)
    if args.memslot:
        snapshot = parse_memslot(args.memslot, snapshot)
    data = export(args.exporter, snapshot, view=args.view, arch=args.arch)
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0
