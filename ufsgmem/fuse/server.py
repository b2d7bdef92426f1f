"""The ufsgmem FUSE server process: mount, serve on one trio loop, unmount on SIGTERM/SIGINT.

``serve()`` mounts with pyfuse3, finds the connection's ``/dev/fuse`` fd for ranged revocation, writes a
pidfile (``/run/ufsgmem/<mountpoint, %-quoted>.pid``) so ``ufsgmem umount`` and tests can end the server
by pid, and reports readiness only once a request has gone through the mount (a stat of ``ctl`` from a
worker thread), so a background ``ufsgmem mount`` returns when the mount is really usable.

Run as ``python -m ufsgmem.fuse.server [--ready-fd N] MOUNTPOINT``; ``ufsgmem mount`` does that for the
background mode. On SIGTERM, SIGINT or SIGHUP the loop ends, the mount is removed (libfuse detaches it
lazily as root, so files still open elsewhere don't keep it busy), every guest_memfd is freed and the
pidfile goes. If the process dies without that, the kernel leaves a "Transport endpoint is not
connected" mount that ``ufsgmem umount`` removes.

The mount is ``noexec``, as the kernel's internal guest_memfd mount is, so a PROT_EXEC mapping of ``mem``
is EPERM as on the kernel. Nothing is ever run from the mount.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import signal
import sys
import urllib.parse

import pyfuse3
import trio

from ..syscalls import parse_cpu_list, pin_process
from .files import Files
from .inodes import ROOT_INO, Namespace
from .ops import Operations
from .revoke import Revoker, find_fuse_fd

log = logging.getLogger("ufsgmem.fuse")

RUN_DIR = "/run/ufsgmem"
FSNAME = "ufsgmem"
FSTYPE = "fuse.ufsgmem"


# --- where a mount's server is recorded -----------------------------------------------------------
def _key(mountpoint: str) -> str:
    return urllib.parse.quote(os.path.realpath(mountpoint), safe="")


def pidfile_path(mountpoint: str) -> str:
    return os.path.join(RUN_DIR, _key(mountpoint) + ".pid")


def logfile_path(mountpoint: str) -> str:
    return os.path.join(RUN_DIR, _key(mountpoint) + ".log")


def read_pid(mountpoint: str) -> int | None:
    try:
        with open(pidfile_path(mountpoint)) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mounts() -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of every mount, in /proc/self/mounts order."""
    with open("/proc/self/mounts") as f:
        return [(fields[1].encode().decode("unicode_escape"), fields[2])  # \040 etc.
                for fields in map(str.split, f)]


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint`` (from /proc/self/mounts), or None."""
    target = os.path.realpath(mountpoint)
    found = None
    for path, fstype in _mounts():
        if path == target:
            found = fstype  # the last one wins (mounts stack)
    return found


def ufsgmem_mounts() -> set[str]:
    """Every mount point with a ufsgmem filesystem on it."""
    return {path for path, fstype in _mounts() if fstype == FSTYPE}


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a missing, non-directory or busy mount point with a clear OSError."""
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise OSError(errno.EBUSY, f"{mountpoint} is a mount whose server died; "
                                       f"run `ufsgmem umount {mountpoint}` first") from None
        raise OSError(exc.errno, f"mount point {mountpoint}: {exc.strerror}") from None
    import stat as _stat
    if not _stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"mount point {mountpoint} is not a directory")
    mounted = mount_type(mountpoint)
    if mounted == FSTYPE:
        try:
            os.listdir(mountpoint)  # the root's attributes may be cached; listing asks the server
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                raise OSError(errno.EBUSY, f"{mountpoint} is a ufsgmem mount whose server died; "
                                           f"run `ufsgmem umount {mountpoint}` first") from None
    if mounted or os.path.ismount(mountpoint):
        raise OSError(errno.EBUSY, f"mount point {mountpoint} is busy: {mounted or 'something'} is "
                                   "already mounted there")


# --- the server -----------------------------------------------------------------------------------
async def _main(ops: Operations, mountpoint: str, ready) -> None:
    async with trio.open_nursery() as nursery:
        async def serve_until_unmounted():
            await pyfuse3.main()  # returns after terminate() or when the mount went away
            nursery.cancel_scope.cancel()
        nursery.start_soon(serve_until_unmounted)
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        st = await trio.to_thread.run_sync(os.stat, os.path.join(mountpoint, "ctl"))
        tune_bdi(st.st_dev)
        ready()


#: Tuning of the mount's bdi (measured here, 1 GiB first touch through a mapping):
#: * read_ahead_kb: each first touch faults a read-around window in through FUSE READ; the default 128 KiB
#:   means one Python request per 32 pages. 4 MiB measured best (256 MiB: 0.41 -> 0.84 GB/s).
#: * max_ratio: FUSE limits a mount to 1% of the dirty threshold, so a writer dirtying a large mapping is
#:   throttled hard; 100 lets it use the global limit like any file (1 GiB: 0.24 -> 0.45 GB/s).
BDI_TUNING = {"read_ahead_kb": 4096, "max_ratio": 100}


#: glibc malloc tuning for the server process. Every FUSE WRITE of a write-back arrives as a fresh bytes
#: object of up to max_write (1 MiB); by default glibc gives such blocks back to the kernel when freed
#: (heap trim above 128 KiB, mmap above its dynamic threshold), so the next write-back faults and zeroes
#: 256 fresh pages per MiB before pyfuse3 can copy into them. Keeping them in the heap measured here:
#: 2 MiB round trip dirty in another process 2.73-2.96 ms -> 1.94-2.14 ms (3 runs each, 60 reps).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_TUNING = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20}


def keep_heap(settings: dict[int, int] = MALLOC_TUNING) -> None:
    try:
        libc = ctypes.CDLL(None)
        for param, value in settings.items():
            libc.mallopt(param, value)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        log.info("cannot tune malloc (not glibc?)")


def tune_bdi(dev: int, settings: dict[str, int] = BDI_TUNING) -> None:
    for knob, value in settings.items():
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/{knob}"
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:  # not root, or no sysfs: keep the default
            log.info("cannot set %s: %s", path, exc)


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            scope.cancel()
            return


async def forget_name(name: str) -> None:
    """Drop a destroyed name from the kernel's dentry cache before ``destroy`` returns (a worker thread:
    the notification blocks until the kernel is done with the directory)."""
    def invalidate() -> None:
        try:
            pyfuse3.invalidate_entry(ROOT_INO, os.fsencode(name))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # not cached: nothing to drop
                raise
    await trio.to_thread.run_sync(invalidate)


def serve(mountpoint: str, *, ready=lambda: None, default_backend: str = "anon", debug: bool = False,
          cpus: set[int] | None = None) -> None:
    """Mount at ``mountpoint`` and serve until a signal; always unmount and free everything on the way out.

    ``cpus`` pins every thread of this process, before trio's worker threads exist (they inherit it).
    """
    check_mountpoint(mountpoint)
    if cpus:
        pin_process(cpus)
    namespace = Namespace()
    files = Files(namespace, None, default_backend=default_backend)
    ops = Operations(files, os.getuid(), os.getgid())
    ops.on_destroy = forget_name
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}", "noexec"}
    if debug:
        options.add("debug")
    # Resolve every path before mounting: once mounted, touching the mount point from this thread
    # before the loop runs would wait forever for ourselves.
    mountpoint = os.path.realpath(mountpoint)
    pidfile = pidfile_path(mountpoint)
    os.makedirs(RUN_DIR, exist_ok=True)
    keep_heap()
    pyfuse3.init(ops, mountpoint, options)
    try:
        files.revoker = Revoker(find_fuse_fd())
        files.mountpoint = mountpoint
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()} {mountpoint}\n")
        trio.run(_main, ops, mountpoint, ready)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            files.worker.close()
            files.write_back_files.close_all()  # the connection is gone: no FLUSH to wait for
            namespace.close_all()
            try:
                with open(pidfile) as f:
                    mine = int(f.read().split()[0]) == os.getpid()
                if mine:
                    os.unlink(pidfile)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.fuse.server")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, help="write 'ready PID' here once the mount works")
    parser.add_argument("--backend", default="anon", help="default backend for create")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--cpus", help="pin the server to these CPUs (kernel CPU-list format)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def report(message: str) -> None:
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, message.encode())
                os.close(args.ready_fd)
            except OSError:
                pass
            args.ready_fd = None

    try:
        cpus = parse_cpu_list(args.cpus) if args.cpus else None
        serve(args.mountpoint, ready=lambda: report(f"ready {os.getpid()}\n"), default_backend=args.backend,
              debug=args.debug, cpus=cpus)
    except Exception as exc:  # noqa: BLE001 - reported to the waiting parent, then fatal
        report(f"error {exc}\n")
        log.exception("server failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
