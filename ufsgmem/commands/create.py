"""Create a guest_memfd file on a ufsgmem mount (KVM_CREATE_GUEST_MEMFD through MOUNTPOINT/ctl).

The new file appears as MOUNTPOINT/NAME/{mem,ctl,guest,status}. Its size never changes. Flags are the
kernel's: mmap (host mmap allowed) and init_shared (memory starts shared; without it every page starts
private and host accesses get SIGBUS). Huge-page backends start private, so they refuse init_shared.

examples:
  ufsgmem create /mnt/gmem vm0 --size 64M --flags mmap,init_shared
  ufsgmem create /mnt/gmem big --size 1G --flags mmap --backend hugetlb --page-size 2M

Errors are the kernel's: EINVAL for a size that is 0 or not page aligned, unknown flags, a page size the
backend lacks or a name longer than 63 bytes; EEXIST for a name in use; ENOMEM when the hugetlb pool is
too small (the message names the shortfall).

Progress: a hugetlb create reserves and zeroes every huge page before the request returns, which takes
seconds per GiB, in one write() to MOUNTPOINT/ctl. The protocol has no progress message, so this command
watches the pool's free_hugepages fall meanwhile and shows how far it got on stderr: with --progress, or
by default when stderr is a terminal and the file is 1 GiB or more. It is an estimate: another user of the
same pool at the same time moves the count too. Otherwise stderr stays quiet.
"""

from __future__ import annotations

import contextlib
import sys
import threading

from .. import hugepages
from ..address import format_size
from ..client import Mount
from ..protocol import parse_flags
from ._gmemargs import report, size_arg

HELP = "create a guest_memfd file on a mount"

#: From this size on, a hugetlb create shows its progress by default when stderr is a terminal.
SLOW_CREATE = 1 << 30
#: The hugetlb backend's default page size (its first), used when --page-size is not given.
HUGETLB_DEFAULT_PAGE = 2 << 20
#: Seconds between two looks at the pool.
POLL = 0.25


def configure(parser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="a ufsgmem mount")
    parser.add_argument("name", metavar="NAME", help="the new file's name (at most 63 bytes of A-Z a-z 0-9 _ . + -)")
    parser.add_argument("--size", required=True, type=size_arg,
                        help="file size: decimal, 0x hex or K/M/G/T (a multiple of the page size)")
    parser.add_argument("--flags", default="0",
                        help="mmap, init_shared, both (mmap,init_shared) or a number; default 0 as the kernel")
    parser.add_argument("--backend", default=None,
                        help="backend plugin (anon, hugetlb, thp, sim, ...); default: the server's")
    parser.add_argument("--page-size", default=None, type=size_arg, metavar="4K|2M|1G",
                        help="huge page size for backends that offer several; default: the backend's")
    parser.add_argument("--no-in-place-conversion", dest="in_place_conversion", action="store_false",
                        default=None,
                        help="this file plays a kernel booted with kvm.gmem_in_place_conversion=0: "
                             "KVM_SET_MEMORY_ATTRIBUTES2 on it is ENOTTY (default: the mount's setting)")
    parser.add_argument("--progress", action="store_true",
                        help="show hugetlb preallocation progress on stderr (default: only on a terminal, "
                             "from 1 GiB)")


class PoolProgress:
    """While a hugetlb create blocks, print how many of its huge pages the pool has handed out.

    A thread reads ``free_hugepages`` every POLL seconds; the pages gone since the start are the file's
    (clamped to what it needs). On a terminal the line is rewritten in place; elsewhere a line is printed
    each time another tenth is done. On success the last line says 100%.
    """

    def __init__(self, name: str, size: int, page_size: int, stream=sys.stderr):
        self.name, self.size, self.page_size, self.stream = name, size, page_size, stream
        self.need = max(1, size // page_size)
        self.tty = stream.isatty()
        self.free_at_start = hugepages.read(page_size, "free_hugepages")  # OSError: no such pool
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="pool-progress", daemon=True)
        self.shown = -1

    def pages_done(self) -> int:
        try:
            gone = self.free_at_start - hugepages.read(self.page_size, "free_hugepages")
        except OSError:
            return 0
        return min(self.need, max(0, gone))

    def show(self, pages: int, final: bool = False) -> None:
        tenth = pages * 10 // self.need
        if not self.tty and tenth == self.shown:  # lines only when another tenth is done
            return
        self.shown = tenth
        line = (f"creating {self.name}: preallocated {format_size(pages * self.page_size)} of "
                f"{format_size(self.size)} ({pages * 100 // self.need}%)")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _watch(self) -> None:
        self.show(0)
        while not self.stop.wait(POLL):
            self.show(self.pages_done())

    def __enter__(self) -> "PoolProgress":
        self.thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.set()
        self.thread.join()
        if exc_type is None:
            self.show(self.need, final=True)
        elif self.tty:
            self.stream.write("\n")  # leave the failure message its own line
            self.stream.flush()


def _progress(args):
    """A PoolProgress for this create, or None when none is wanted or the pool cannot be read."""
    if args.backend != "hugetlb":
        return None
    if not (args.progress or (sys.stderr.isatty() and args.size >= SLOW_CREATE)):
        return None
    try:
        return PoolProgress(args.name, args.size, args.page_size or HUGETLB_DEFAULT_PAGE)
    except OSError:
        return None


def run(args) -> int:
    def create() -> int:
        flags = parse_flags(args.flags)
        with Mount(args.mountpoint) as mount:
            progress = _progress(args)
            with progress or contextlib.nullcontext():
                f = mount.create(args.name, args.size, flags, backend=args.backend, page_size=args.page_size,
                                 in_place_conversion=args.in_place_conversion)
            with f:
                status = f.status()
        print(f"created {args.mountpoint.rstrip('/')}/{args.name}: {format_size(status['size'])}, "
              f"flags {status['flags']:#x} ({','.join(status.get('flag_names', [])) or 'none'}), "
              f"backend {status['backend']}, page size {format_size(status['page_size'])}")
        return 0
    return report("create", create)

