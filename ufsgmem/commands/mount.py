"""Mount a ufsgmem filesystem at MOUNTPOINT.

Without --foreground the server runs on in the background and this command returns once the mount
answers requests (it waits on a readiness pipe). The server's pid is written to
/run/ufsgmem/<mountpoint>.pid and its log to /run/ufsgmem/<mountpoint>.log. SIGTERM or SIGINT to the
server unmounts cleanly; `ufsgmem umount MOUNTPOINT` does that for you.

The layout: MOUNTPOINT/ctl creates and destroys guest_memfd files (`echo create vm size=1G
flags=mmap|init_shared > MOUNTPOINT/ctl`); each one appears as MOUNTPOINT/NAME/{mem,ctl,guest,status,
snapshot}.
"""

from __future__ import annotations

import os
import subprocess
import sys

HELP = "mount a ufsgmem filesystem (guest_memfd files over FUSE)"


def configure(parser) -> None:
    parser.add_argument("mountpoint", help="an existing, empty directory")
    parser.add_argument("--foreground", "-f", action="store_true", help="serve in this process until a signal")
    parser.add_argument("--backend", default="anon", help="default backend for files created without one")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request (foreground only useful)")


def run(args) -> int:
    from ..fuse import server

    server.check_mountpoint(args.mountpoint)
    if args.foreground:
        server.serve(args.mountpoint, default_backend=args.backend, debug=args.debug,
                     ready=lambda: print(f"ufsgmem: mounted at {args.mountpoint} (pid {os.getpid()})",
                                         file=sys.stderr, flush=True))
        return 0
    pid = start_background(args.mountpoint, backend=args.backend, debug=args.debug)
    print(f"ufsgmem: mounted at {args.mountpoint} (server pid {pid})")
    return 0


def start_background(mountpoint: str, *, backend: str = "anon", debug: bool = False) -> int:
    """Start the server detached; return its pid once the mount works, or raise OSError with its error."""
    from ..fuse import server

    os.makedirs(server.RUN_DIR, exist_ok=True)
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "ufsgmem.fuse.server", "--ready-fd", str(write_end),
               "--backend", backend, mountpoint] + (["--debug"] if debug else [])
    with open(server.logfile_path(mountpoint), "ab") as logfile:
        proc = subprocess.Popen(command, pass_fds=(write_end,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message.startswith("ready"):
        return proc.pid
    code = proc.wait()
    detail = message.removeprefix("error ").strip() or f"the server exited with status {code}"
    raise OSError(f"cannot mount {mountpoint}: {detail} (log: {server.logfile_path(mountpoint)})")
