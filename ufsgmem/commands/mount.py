"""Mount a ufsgmem filesystem at MOUNTPOINT.

Without --foreground the server runs on in the background and this command returns once the mount
answers requests (it waits on a readiness pipe). The server's pid is written to <run dir>/<mountpoint>.pid
and its log to <run dir>/<mountpoint>.log, where the run dir is /run/ufsgmem for root and
$XDG_RUNTIME_DIR/ufsgmem (else ~/.cache/ufsgmem) for anyone else (ufsgmem/runtime.py). SIGTERM or SIGINT
to the server unmounts cleanly; `ufsgmem umount MOUNTPOINT` does that for you.

Any user may mount on a directory of their own: a user's server mounts through fusermount3
(ufsgmem/fuse/usermount.py). What needs more than that says so when asked for: --allow-other needs
`user_allow_other` in /etc/fuse.conf, --low-latency needs root.

--cpus pins the server (every thread it will have) to the given CPUs. A FUSE request costs two
wake-ups, and on a VM a wake-up that crosses to another vCPU is expensive: measured here, a 4 KiB
shared→private→shared round trip through ``ctl`` took ~165 µs with the caller and the server free and ~86
µs with both on one CPU; pinning the server alone took a dirty 4 KiB round trip from ~335 to ~290 µs
(its revocation hops between its own threads). The price: the server's copies then share that CPU, and
first-touch throughput of a mapping halved here (2.0 → 1.0 GB/s). So pin when conversion latency
matters most, and pin the VMM thread that converts to the same CPU.

--low-latency keeps idle CPUs polling instead of sleeping while requests flow (a 0 µs CPU latency limit
through /dev/cpu_dma_latency, root only, dropped after 0.2 s without a request). On a VM whose idle vCPUs
halt into the host, part of a conversion's latency is waking a halted vCPU: a dirty 4 KiB round trip
measured 10-30 % shorter with it, alternating with a plain mount (docs/performance.md). The price: while
it holds, every idle CPU of the machine spins.

--max-memory SIZE bounds the guest memory the mount commits (a folio counts from the moment a mapping
reads any of it in until it is revoked, punched or freed): past it the request that needs more fails,
a fault with SIGBUS, fallocate, guest accesses and preallocating creates with ENOMEM. A server started
inside a limited memory cgroup leaves it (where the kernel refuses PR_SET_IO_FLUSHER, sharing such a
cgroup with the processes that map its files can deadlock them all) and takes the limit as its cap.

The layout: MOUNTPOINT/ctl creates and destroys guest_memfd files (`echo create vm size=1G
flags=mmap|init_shared > MOUNTPOINT/ctl`); each one appears as MOUNTPOINT/NAME/{mem,ctl,guest,status,
snapshot}.
"""

from __future__ import annotations

import os
import sys

from ..mounts import start_background

HELP = "mount a ufsgmem filesystem (guest_memfd files over FUSE)"


def configure(parser) -> None:
    parser.add_argument("mountpoint", help="an existing, empty directory")
    parser.add_argument("--foreground", "-f", action="store_true", help="serve in this process until a signal")
    parser.add_argument("--backend", default="anon", help="default backend for files created without one")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request (foreground only useful)")
    parser.add_argument("--no-in-place-conversion", action="store_true",
                        help="play a kernel booted with kvm.gmem_in_place_conversion=0: "
                             "ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2) is ENOTTY, so a VMM can test its fallback "
                             "(a file created with in_place_conversion=1 still converts)")
    parser.add_argument("--allow-other", action="store_true",
                        help="serve other users too (a VMM rarely runs as root; mounting as a user, this needs "
                             "user_allow_other in /etc/fuse.conf): any user may create files through MOUNTPOINT/ctl, "
                             "each file belongs to its creator (mode 0600, enforced by the kernel: "
                             "default_permissions), and only its owner, you, or root may destroy it")
    parser.add_argument("--max-memory", metavar="SIZE", type=_size,
                        help="cap the guest memory this mount commits (e.g. 8G): backend memory plus pages a mapping "
                             "has read in but not yet written; past the cap the request that needs more gets ENOMEM "
                             "(a faulting mapping SIGBUS), never the server an OOM kill (see docs/reliability.md)")
    parser.add_argument("--low-latency", action="store_true",
                        help="while requests flow (and 0.2 s after), keep idle CPUs polling instead of sleeping "
                             "(a 0 µs CPU latency limit, root only): faster conversions on a VM whose idle vCPUs halt, "
                             "paid for in CPU time on every CPU (see docs/performance.md)")
    parser.add_argument("--hot-path", choices=("compiled", "python"), default="compiled",
                        help="who serves mem's page fills, write-backs and conversions in the common case: "
                             "the server's C code (compiled, the default) or its Python handlers (python: the "
                             "reference, slower; the same answers); status shows which served how many")
    parser.add_argument("--per-user", metavar="BOUNDS", type=_per_user,
                        help="what each user other than root and you may hold of the server under --allow-other: "
                             "files=N (default 1024), handles=N (open files, 4096), memory=SIZE (committed guest "
                             "memory, huge pages included; half of --max-memory, else of the machine's), huge=SIZE "
                             "(hugetlb pool; half of each size's pool), results=SIZE (server memory for status, "
                             "snapshot and results; 64M); 'none' lifts one (see docs/reliability.md)")
    parser.add_argument("--cpus", metavar="LIST",
                        help="pin the server to these CPUs (e.g. 0 or 0,2-3): lower conversion latency for a "
                             "caller pinned to the same CPU, lower first-touch throughput (see docs/performance.md)")


def _size(text: str) -> int:
    import argparse

    from ..address import parse_size
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the cap must be positive")
    return size


def _per_user(text: str) -> str:
    import argparse

    from ..fuse.users import UserLimits
    try:
        UserLimits.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def run(args) -> int:
    from ..fuse import server
    from ..syscalls import parse_cpu_list

    server.check_mountpoint(args.mountpoint)
    args.mountpoint = os.path.realpath(args.mountpoint)  # a symlink is followed: say where it really went
    cpus = parse_cpu_list(args.cpus) if args.cpus else None  # checked here, before anything starts
    if args.foreground:
        server.serve(args.mountpoint, default_backend=args.backend, debug=args.debug, cpus=cpus,
                     in_place_conversion=not args.no_in_place_conversion, allow_other=args.allow_other,
                     max_memory=args.max_memory, low_latency=args.low_latency, per_user=args.per_user,
                     hot_path=args.hot_path, ready=lambda: print(f"ufsgmem: mounted at {args.mountpoint} (pid {os.getpid()})",
                                         file=sys.stderr, flush=True))
        return 0
    pid = start_background(args.mountpoint, backend=args.backend, debug=args.debug, cpus=args.cpus,
                           in_place_conversion=not args.no_in_place_conversion, allow_other=args.allow_other,
                           max_memory=args.max_memory, low_latency=args.low_latency, per_user=args.per_user,
                           hot_path=args.hot_path)
    print(f"ufsgmem: mounted at {args.mountpoint} (server pid {pid})")
    return 0
