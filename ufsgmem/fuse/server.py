"""The ufsgmem FUSE server process: mount, serve on libfuse's multi-threaded loop, unmount on a signal.

``serve()`` mounts through libfuse's low-level API (``lowlevel.py``); as root directly, as any other user
through ``fusermount3`` (``usermount.py``). It writes a pidfile (``<runtime dir>/<mountpoint,
%-quoted>.pid``: pid, start time, mount point; the runtime directory is ``/run/ufsgmem`` for root,
``$XDG_RUNTIME_DIR/ufsgmem`` or ``~/.cache/ufsgmem`` for a user, ``ufsgmem/runtime.py``) so ``ufsgmem
umount`` and tests can end the server by pid, and reports readiness only once a request has gone through
the mount (a stat of ``ctl`` from a helper thread while the loop runs), so a background ``ufsgmem mount``
returns when the mount is really usable.

Run as ``python -m ufsgmem.fuse.server [--ready-fd N] MOUNTPOINT``; ``ufsgmem mount`` does that for the
background mode. On SIGTERM, SIGINT or SIGHUP the loop ends, the mount is removed (detached lazily, by
libfuse as root or ``fusermount3 -u -z`` as a user, so files still open elsewhere don't keep it busy),
every guest_memfd is freed and the pidfile goes. If the process dies without that, the kernel leaves a
"Transport endpoint is not connected" mount that ``ufsgmem umount`` removes.

The mount is ``noexec``, as the kernel's internal guest_memfd mount is, so a PROT_EXEC mapping of ``mem``
is EPERM as on the kernel. Nothing is ever run from the mount.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import sys
import urllib.parse
import resource
import threading
import time

from ..address import format_size
from ..mounts import FSTYPE, mount_type
from ..runtime import ROOT_DIR, ensure_run_dir, run_dir
from ..syscalls import parse_cpu_list, pin_process, prctl
from . import memcg, usermount
from .abort import mount_path, start_watcher
from .files import Files
from .inodes import ROOT_INO, map_big_allocations
from .latency import LatencyHold
from .lowlevel import Session
from .ops import Operations
from .users import UserLimits
from .revoke import InodeInvalidator

log = logging.getLogger("ufsgmem.fuse")

RUN_DIR = ROOT_DIR  # root's; a user's is run_dir() (ufsgmem/runtime.py)
FSNAME = "ufsgmem"


# --- where a mount's server is recorded -----------------------------------------------------------
def _key(mountpoint: str) -> str:
    return urllib.parse.quote(mount_path(mountpoint), safe="")


def pidfile_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), _key(mountpoint) + ".pid")


def logfile_path(mountpoint: str) -> str:
    return os.path.join(run_dir(), _key(mountpoint) + ".log")


def read_pid(mountpoint: str) -> int | None:
    return read_pidfile(mountpoint)[0]


def read_pidfile(mountpoint: str) -> tuple[int | None, int | None]:
    """``(pid, start time)`` from the pidfile (``PID STARTTIME MOUNTPOINT``), Nones where unreadable."""
    try:
        with open(pidfile_path(mountpoint)) as f:
            words = f.read().split()
        return int(words[0]), int(words[1]) if len(words) > 2 else None
    except (OSError, ValueError, IndexError):
        return None, None


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with the pid, it
    names one process for good, unlike a pid alone, which the kernel reuses. Reading it never touches the
    process's memory, so it answers even for a process stuck while exiting."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a missing, non-directory, busy mount point, or one the caller does not own, with a clear
    OSError."""
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
    if st.st_uid != os.getuid():  # mounting over someone else's directory would hide their files
        raise OSError(errno.EPERM, f"mount point {mountpoint} belongs to uid {st.st_uid}, not to you "
                                   f"(uid {os.getuid()}): mount on a directory you own")
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
LOOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _report_ready(mountpoint: str, ready, failed) -> None:
    """In a helper thread once the loop runs: a request through the mount, the bdi tuned, then ``ready()``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)  # they belong to the loop's thread
    try:
        st = os.stat(os.path.join(mountpoint, "ctl"))
        tune_bdi(st.st_dev)
        ready()
    except OSError as exc:
        failed(exc)


#: Tuning of the mount's bdi (figures: docs/performance.md, "The mount's bdi tuning"):
#: * read_ahead_kb: each first touch faults a read-around window in through FUSE READ; the default 128 KiB
#:   means one Python request per 32 pages, so a larger window means fewer requests a first touch.
#: * max_ratio: FUSE limits a mount to 1% of the dirty threshold, so a writer dirtying a large mapping is
#:   throttled hard; 100 lets it use the global limit like any file.
BDI_TUNING = {"read_ahead_kb": 4096, "max_ratio": 100}


PR_SET_IO_FLUSHER = 57


def harden() -> int | None:
    """Process settings a server needs to stay up (docs/reliability.md); returns a memory limit the server
    left behind, which the caller applies as its ``--max-memory``:

    * big allocations in mappings of their own, so held results' memory goes back when they are freed
      (``inodes.map_big_allocations``);
    * the descriptor limit raised to the hard limit: each file costs a backend memfd and a write-back
      descriptor, and a revocation that cannot open one must not fail for that;
    * ``PR_SET_IO_FLUSHER``: this process writes back dirty pages for others (its WRITE handlers), so its
      own allocations must not wait on that write-back when memory is tight (the kernel then avoids
      reclaim that would recurse into FUSE I/O), as for other userspace block and filesystem servers;
    * without it, no limited memory cgroup: there a write-back's allocation can wait in reclaim for other
      write-backs only this server serves, and every thread ends up waiting (measured: a hang, see
      ``memcg.py``). The server moves itself to the nearest cgroup no limit binds, and the tightest limit
      it left becomes its cap, enforced as ENOMEM at the request instead of by reclaim. Where it cannot
      move (a container), it says so as a warning.
    """
    map_big_allocations()  # big results go back to the kernel when they are freed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # A caller with these blocked (they are inherited through fork and exec) would get a server that
    # ignores `ufsgmem umount`.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LOOP_SIGNALS)
    try:
        prctl(PR_SET_IO_FLUSHER, 1)
        return None
    except OSError as exc:  # needs CAP_SYS_RESOURCE, which some containers withhold even from root
        log.info("PR_SET_IO_FLUSHER unavailable (%s): keep the server out of memory cgroups it serves "
                 "(docs/reliability.md)", os.strerror(exc.errno))
    limits, failed = memcg.leave_limits()
    if not limits:
        return None
    tightest = min(limits, key=lambda lim: lim.limit)
    if failed:
        log.warning("%s (%s)", memcg.limit_warning() or "this server runs under a memory limit", failed)
        return None
    log.warning("left memory cgroup %s (%s = %s): a server sharing a limited cgroup with the processes that map "
                "its files can hang them all; that limit now caps this mount as --max-memory would "
                "(docs/reliability.md)", tightest.cgroup, tightest.knob, format_size(tightest.limit))
    return tightest.limit


def tune_bdi(dev: int, settings: dict[str, int] = BDI_TUNING) -> None:
    for knob, value in settings.items():
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/{knob}"
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError as exc:  # not root, or no sysfs: keep the default
            log.info("cannot set %s: %s", path, exc)


def serve(mountpoint: str, *, ready=lambda: None, default_backend: str = "anon", debug: bool = False,
          cpus: set[int] | None = None, in_place_conversion: bool = True, allow_other: bool = False,
          max_memory: int | None = None, low_latency: bool = False, per_user: str | None = None,
          hot_path: str = "compiled") -> None:
    """Mount at ``mountpoint`` and serve until a signal; always unmount and free everything on the way out.

    ``cpus`` pins every thread of this process, before libfuse's workers exist (they inherit it).
    ``in_place_conversion`` False plays a kernel booted with ``kvm.gmem_in_place_conversion=0``: files
    created without saying otherwise answer KVM_SET_MEMORY_ATTRIBUTES2 with ENOTTY. ``max_memory``
    caps the guest memory the mount commits (``budget.py``): past it a fill, allocation or create is ENOMEM.
    ``low_latency`` holds a CPU latency limit of 0 µs while requests flow (``latency.py``; root only).
    ``per_user`` changes the per-user bounds (``users.py``: ``files=N,handles=N,memory=SIZE,...``).
    ``hot_path`` ``python`` serves every request in Python instead of mem's common ones in C (``fastpath.py``).
    """
    check_mountpoint(mountpoint)
    if cpus:
        pin_process(cpus)
    limit = harden()  # a memory cgroup limit it had to leave becomes the cap (the tighter one wins)
    if limit is not None:
        max_memory = limit if max_memory is None else min(max_memory, limit)
    hold = LatencyHold() if low_latency else None  # before mounting: a refusal is the mount's error
    limits = UserLimits.parse(per_user or "")  # a bad spec is the mount's error, before anything exists
    make_files = functools.partial(Files, latency=hold, default_backend=default_backend,
                                   in_place_conversion=in_place_conversion, max_memory=max_memory, per_user=limits)
    server = _Server.open(mountpoint, make_files, hold, debug=debug, allow_other=allow_other, hot_path=hot_path)
    try:
        server.mount()
        start_watcher(server.mountpoint, server.fuse_fd)  # from this (main) thread, before any other thread exists
        server.write_pidfile()
        server.start_helpers(ready)
        server.loop()
    finally:
        server.teardown()


class _Server:
    """One run of :func:`serve`, in the order it happens: :meth:`open` the session, :meth:`mount`, (the
    watcher), :meth:`write_pidfile`, :meth:`start_helpers` (readiness, the latency hold), :meth:`loop`,
    :meth:`teardown`."""

    def __init__(self, mountpoint: str, session: Session, hold: LatencyHold | None, options: list[str]):
        self.mountpoint = mountpoint
        self.pidfile = pidfile_path(mountpoint)
        self.session = session
        self.files: Files = session.handler.files
        self.hold = hold
        self.options = options
        self.fuse_fd = -1
        self.user_mounted = False  # by fusermount3, so ours to unmount
        self.failure: list[OSError] = []  # the readiness check's, raised once the loop ends

    @classmethod
    def open(cls, mountpoint: str, make_files, hold: LatencyHold | None, *, debug: bool,
             allow_other: bool, hot_path: str = "compiled") -> _Server:
        """The session, its handlers and their ``Files`` (``make_files(invalidator, mountpoint=...)``), not
        yet mounted."""
        options = [f"fsname={FSNAME}", f"subtype={FSNAME}", "noexec"] + (["debug"] if debug else []) \
            + (["allow_other", "default_permissions"] if allow_other else [])
        # Resolve every path before mounting: once mounted, touching the mount point from this thread
        # before the loop runs would wait forever for ourselves.
        mountpoint = os.path.realpath(mountpoint)
        ensure_run_dir()
        started_ns = time.time_ns()

        def operations(session: Session) -> Operations:
            return Operations(make_files(InodeInvalidator(session), mountpoint=mountpoint, fast=session.fast),
                              allow_other=allow_other,
                              started_ns=started_ns, on_destroy=lambda name: session.inval_entry(ROOT_INO, name))

        session = Session.serving(operations, options, uid=os.getuid(), gid=os.getgid(), time_ns=started_ns,
                                  on_request=None if hold is None else hold.touch, hot_path=hot_path)
        if hold is not None:
            hold.attach(session.fast)
        server = cls(mountpoint, session, hold, options)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # libfuse installs its handlers only over the defaults
        return server

    def mount(self) -> None:
        if os.geteuid() != 0:
            # libfuse takes an open /dev/fuse as the mount point /dev/fd/N and leaves unmounting to us.
            self.fuse_fd = usermount.mount(self.mountpoint, [o for o in self.options if o != "debug"])
            self.user_mounted = True
            self.session.mount(f"/dev/fd/{self.fuse_fd}")
        else:
            self.session.mount(self.mountpoint)
            self.fuse_fd = self.session.fd

    def write_pidfile(self) -> None:
        fd = os.open(self.pidfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {start_time(os.getpid())} {self.mountpoint}\n")

    def start_helpers(self, ready) -> None:
        """The readiness check and the latency hold's thread, started with the loop's signals blocked, so
        they reach this thread only."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)
        helper = threading.Thread(target=_report_ready, name="ufsgmem-ready", daemon=True,
                                  args=(self.mountpoint, ready, self._failed))
        helper.start()
        if self.hold is not None:
            self.hold.start()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _failed(self, exc: OSError) -> None:
        self.failure.append(exc)
        self.session.exit()

    def loop(self) -> None:
        """Serve until a signal or an unmount; raise what ended it otherwise."""
        result = self.session.loop()
        if self.failure:
            raise self.failure[0]
        if result < 0:
            raise OSError(-result, f"the FUSE loop failed: {os.strerror(-result)}")
        log.info("the loop ended (%s)", f"signal {result}" if result > 0 else "unmounted")

    def teardown(self) -> None:
        """Unmount, free every file and remove the pidfile, each even if the one before failed."""
        try:
            if self.user_mounted:
                usermount.unmount(self.mountpoint)  # libfuse unmounts only what it mounted itself
            self.session.close()
        finally:
            self.files.write_back_files.close_all()  # the connection is gone: nothing to flush
            if self.hold is not None:
                self.hold.close()
            self.files.ns.close_all()
            try:
                if read_pid(self.mountpoint) == os.getpid():
                    os.unlink(self.pidfile)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.fuse.server")
    parser.add_argument("mountpoint")
    parser.add_argument("--ready-fd", type=int, help="write 'ready PID' here once the mount works")
    parser.add_argument("--backend", default="anon", help="default backend for create")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--cpus", help="pin the server to these CPUs (kernel CPU-list format)")
    parser.add_argument("--no-in-place-conversion", action="store_true",
                        help="play a kernel booted with kvm.gmem_in_place_conversion=0")
    parser.add_argument("--allow-other", action="store_true", help="serve other users (files belong to their creator)")
    parser.add_argument("--max-memory", type=int, help="cap on committed guest memory, in bytes")
    parser.add_argument("--low-latency", action="store_true", help="hold a 0 µs CPU latency limit while requests flow")
    parser.add_argument("--per-user", help="per-user bounds: files=N,handles=N,memory=SIZE,huge=SIZE,results=SIZE")
    parser.add_argument("--hot-path", choices=("compiled", "python"), default="compiled",
                        help="mem's common requests served in C (compiled) or all in Python")
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
              debug=args.debug, cpus=cpus, in_place_conversion=not args.no_in_place_conversion,
              allow_other=args.allow_other, max_memory=args.max_memory, low_latency=args.low_latency,
              per_user=args.per_user, hot_path=args.hot_path)
    except Exception as exc:  # noqa: BLE001 - reported to the waiting parent, then fatal
        report(f"error {exc}\n")
        log.exception("server failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
