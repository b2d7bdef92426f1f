"""Create a guest_memfd file on a ufsgmem mount (KVM_CREATE_GUEST_MEMFD through MOUNTPOINT/ctl).

The new file appears as MOUNTPOINT/NAME/{mem,ctl,guest,status}. Its size never changes. Flags are the
kernel's: mmap (host mmap allowed) and init_shared (memory starts shared; without it every page starts
private and host accesses get SIGBUS). Huge-page backends start private, so they refuse init_shared.

examples:
  ufsgmem create /mnt/gmem vm0 --size 64M --flags mmap,init_shared
  ufsgmem create /mnt/gmem big --size 1G --flags mmap --backend hugetlb --page-size 2M

Errors are the kernel's: EINVAL for a size that is 0 or not page aligned, unknown flags, or a page size
the backend lacks; EEXIST for a name in use; ENOMEM when the hugetlb pool is too small (the message names
the shortfall).
"""

from __future__ import annotations

import sys

from ..address import format_size
from ..client import Mount, parse_flags
from ._gmemargs import report, size_arg

HELP = "create a guest_memfd file on a mount"

#: Above this, a preallocating (hugetlb) create is announced as possibly slow.
SLOW_CREATE = 1 << 30


def configure(parser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a ufsgmem mount")
    parser.add_argument("name", metavar="NAME", help="the new file's name (under 64 bytes, no '/')")
    parser.add_argument("--size", required=True, type=size_arg,
                        help="file size: decimal, 0x hex or K/M/G/T (a multiple of the page size)")
    parser.add_argument("--flags", default="0",
                        help="mmap, init_shared, both (mmap,init_shared) or a number; default 0 as the kernel")
    parser.add_argument("--backend", default=None,
                        help="backend plugin (anon, hugetlb, thp, sim, ...); default: the server's")
    parser.add_argument("--page-size", default=None, type=size_arg, metavar="4K|2M|1G",
                        help="huge page size for backends that offer several; default: the backend's")


def run(args) -> int:
    def create() -> int:
        flags = parse_flags(args.flags)
        if args.backend == "hugetlb" and args.size >= SLOW_CREATE:
            print(f"creating {format_size(args.size)} on hugetlb: every huge page is reserved and zeroed up "
                  "front, this may take a while...", file=sys.stderr, flush=True)
        with Mount(args.mountpoint) as mount:
            f = mount.create(args.name, args.size, flags, backend=args.backend, page_size=args.page_size)
            with f:
                status = f.status()
        print(f"created {args.mountpoint.rstrip('/')}/{args.name}: {format_size(status['size'])}, "
              f"flags {status['flags']:#x} ({','.join(status.get('flag_names', [])) or 'none'}), "
              f"backend {status['backend']}, page size {format_size(status['page_size'])}")
        return 0
    return report("create", create)

