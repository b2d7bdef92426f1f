"""Run a program as if this kernel had guest_memfd with in-place conversion (series v8, or 6.18).

    ufsgmem run [--mount MNT] [--backend NAME] [--kernel v8|6.18] -- PROGRAM ARGS...

PROGRAM runs unmodified with an interposer preloaded: KVM_CHECK_EXTENSION reports guest_memfd,
KVM_CREATE_GUEST_MEMFD returns a file of a ufsgmem mount, KVM_SET_USER_MEMORY_REGION2 with
KVM_MEM_GUEST_MEMFD binds it (also with a NULL userspace_addr), and a real vCPU reads and writes its
shared and private pages while every host mapping of a private page gets SIGBUS. Everything else goes to
the kernel as it is.

Without --mount, a mount is made for the program in a private directory and removed when it ends,
however it ends. --kernel 6.18 plays today's kernels (no guest_memfd ioctl: ENOTTY; the VM's
KVM_SET_MEMORY_ATTRIBUTES refuses PRIVATE, as on a VM without private memory). A statically linked or setuid program cannot
be reached and is refused. The exit status is the program's (128+N if signal N ended it).
"""

from __future__ import annotations

import sys

HELP = "run an unmodified VMM as if the kernel had guest_memfd (LD_PRELOAD interposer over a mount)"


def configure(parser) -> None:
    parser.usage = "ufsgmem run [--mount MNT] [--backend NAME] [--kernel v8|6.18] -- PROGRAM [ARGS...]"
    parser.add_argument("--mount", metavar="MNT", help="an existing ufsgmem mount (default: a private one)")
    parser.add_argument("--backend", help="backend of the files the program creates (default: the mount's)")
    parser.add_argument("--kernel", choices=("v8", "6.18"), default="v8",
                        help="the kernel to play: v8 (in-place conversion, the default) or 6.18")
    parser.add_argument("program", nargs="+", metavar="PROGRAM", help="the program, then its arguments (after --)")


def run(args) -> int:
    from ..run import NotReachable, RunError, ShimUnavailable, run_program

    try:
        return run_program(args.program, mount=args.mount, backend=args.backend, kernel=args.kernel)
    except (NotReachable, RunError, ShimUnavailable) as exc:
        print(f"ufsgmem run: {exc}", file=sys.stderr)
        return 127
