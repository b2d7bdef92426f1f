"""The server of a private ``ufsgmem run`` mount: ``ufsgmem.fuse.server``, then its directory goes.

Run as ``python -m ufsgmem.run.server TOPDIR SERVER-ARGS...`` (``session.run_mount`` does). When the
server's loop ends (SIGTERM from ``run``, or from the kernel through ``PR_SET_PDEATHSIG`` when ``run`` was
killed), the mount is gone, and this removes ``TOPDIR`` (the mount point and the log) so a killed ``run``
leaves nothing behind; after a failure the log stays there for reading.
"""

from __future__ import annotations

import os
import shutil
import sys

from .. import mounts
from ..fuse import server as fuse_server


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top, rest = argv[0], argv[1:]
    code = 1
    try:
        code = fuse_server.main(rest)
    finally:
        mountpoint = os.path.join(top, "mnt")
        if mounts.mount_type(mountpoint) is None:
            if code == 0:
                shutil.rmtree(top, ignore_errors=True)
            else:
                try:
                    os.rmdir(mountpoint)
                except OSError:
                    pass
    return code


if __name__ == "__main__":
    sys.exit(main())
