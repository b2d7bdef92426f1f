"""Unmount a ufsgmem filesystem: stop its server, and clean up after one that died or hangs.

The steps (``ufsgmem.mounts.unmount``, which says why each one is there): signal the server recorded in
<run dir>/<mountpoint>.pid only if it really is this mount's (same pid and start time); SIGTERM, then
SIGKILL after ``--timeout``; if the mount is still there, abort its FUSE connection so no client stays
blocked, and remove it lazily. Each step that was needed is reported.
"""

from __future__ import annotations

import sys

from ..mounts import unmount

HELP = "unmount a ufsgmem filesystem (also cleans up after a dead or hung server)"


def configure(parser) -> None:
    parser.add_argument("mountpoint")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server to exit")


def run(args) -> int:
    for line in unmount(args.mountpoint, timeout=args.timeout):
        print(f"ufsgmem umount: {line}", file=sys.stderr)
    return 0
