"""Run the whole thing on built-in defaults: mount, create, convert from a VMM-like script while a second
process maps the memory, observe SIGBUS, export the layout, print a summary, and clean up.

Everything happens in a temporary directory: a background ufsgmem mount, one guest_memfd (64 MiB by
default) on the best backend available — hugetlb with 2 MiB pages when the huge page pool can be grown
for it (the pages are given back at the end), else anon. A second process maps the file MAP_SHARED and
writes to it while this one converts ranges shared->private->shared, punches a hole and hits a pin
(EAGAIN); the second process reports the SIGBUS it sees on private pages. The layout is exported as text
and PNG when the layout exporters are installed. Whatever happens (errors, Ctrl-C), the file is destroyed,
the mount unmounted and the huge pages released. Exit status 0 means every check passed. Needs root
(FUSE, huge pages).
"""

from __future__ import annotations

from ._gmemargs import size_arg

HELP = "run the real thing end to end on built-in defaults"


def configure(parser) -> None:
    parser.add_argument("--size", type=size_arg, default=64 << 20,
                        help="guest_memfd size, a multiple of 2M and at least 16M (default 64M)")
    parser.add_argument("--backend", default=None,
                        help="force a backend (default: hugetlb if the pool can be grown, else anon)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where the layout text and PNG go (default: a temporary directory, kept)")


def run(args) -> int:
    import sys

    from .. import demo
    if args.size % (2 << 20) or args.size < 16 << 20:
        print("ufsgmem demo: EINVAL: --size must be a multiple of 2M and at least 16M", file=sys.stderr)
        return 1
    return demo.run(size=args.size, out_dir=args.out, backend=args.backend)
