"""Destroy a guest_memfd file on a ufsgmem mount ("destroy NAME" through MOUNTPOINT/ctl).

The name disappears at once. As in the kernel, the memory itself is freed only when the last open file
and the last mapping of it are gone. ENOENT if there is no such file.

example:
  ufsgmem destroy /mnt/gmem vm0
"""

from __future__ import annotations

from ..client import Mount
from ._gmemargs import report

HELP = "destroy a guest_memfd file on a mount"


def configure(parser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a ufsgmem mount")
    parser.add_argument("name", metavar="NAME", help="the file to destroy")


def run(args) -> int:
    def destroy() -> int:
        with Mount(args.mountpoint) as mount:
            mount.destroy(args.name)
        print(f"destroyed {args.mountpoint.rstrip('/')}/{args.name}")
        return 0
    return report("destroy", destroy)
