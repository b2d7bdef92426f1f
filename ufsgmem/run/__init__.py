"""``ufsgmem run``: an unmodified program against a kernel without guest_memfd, as if it had one.

The program runs with ``shim.c`` preloaded (``LD_PRELOAD``), which answers KVM's guest_memfd ioctls from
a ufsgmem mount and gives KVM plain memslots over hidden mappings of each file's ``mem`` (shared pages) and
``private`` (private pages) views, so a real vCPU reaches both (docs/architecture.md, "ufsgmem run").

* :mod:`.shim` builds the interposer (cached by source hash) and hands out its path;
* :mod:`.elf` tells in advance whether the interposer can reach a program (dynamically linked, not
  setuid/setgid or file-capable);
* :mod:`.session` owns the lifetimes: a private mount for the program (unless one is given), the program
  itself, the handshake that proves the interposer loaded, and the clean-up however the program ends.

This package never imports :mod:`ufsgmem.commands`; the command module calls in here.
"""

from .elf import NotReachable, check_reachable  # noqa: F401
from .session import RunError, run_program, run_mount  # noqa: F401
from .shim import ShimUnavailable, build_shim  # noqa: F401
