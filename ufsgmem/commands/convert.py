"""Convert a range of a guest_memfd file between shared and private (KVM_SET_MEMORY_ATTRIBUTES2).

One binary write to MOUNTPOINT/NAME/ctl. Shared→private first unmaps the range from every process that
maps it (their next access gets SIGBUS), then flips the attribute; private→shared makes it mappable
again. Content is preserved both ways. Converting to the state a range already has succeeds at once.

examples:
  ufsgmem convert /mnt/gmem/vm0 --offset 2M --size 4K --to private
  ufsgmem convert /mnt/gmem/vm0 --offset 0x200000 --size 0x1000 --to shared

Errors are the kernel's: EINVAL for an unaligned, empty or out-of-file range; EAGAIN when a page in the
range is pinned (error_offset names the first one; unpin and retry).
"""

from __future__ import annotations

from ..address import format_size
from ..client import GmemFile
from ._gmemargs import report, size_arg

HELP = "convert a range shared <-> private"


def configure(parser) -> None:
    parser.add_argument("file", metavar="MOUNTPOINT/NAME", help="a guest_memfd file on a ufsgmem mount")
    parser.add_argument("--offset", required=True, type=size_arg, help="start of the range (page aligned)")
    parser.add_argument("--size", required=True, type=size_arg, help="length of the range (page aligned)")
    parser.add_argument("--to", required=True, choices=("private", "shared"), help="the new attribute")


def run(args) -> int:
    def convert() -> int:
        with GmemFile(args.file) as f:
            f.convert(args.offset, args.size, to=args.to)
        print(f"converted [{args.offset:#x}, {args.offset + args.size:#x}) ({format_size(args.size)}) "
              f"of {args.file} to {args.to}")
        return 0
    return report("convert", convert)
