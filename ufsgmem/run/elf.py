"""Can an LD_PRELOAD library reach this program? Decided before it runs, so it never runs natively.

The dynamic loader honours ``LD_PRELOAD`` only for a program it loads: an ELF file with a ``PT_INTERP``
program header. A statically linked program (static-pie included: it has no ``PT_INTERP``) never sees the
library. Nor does a program the kernel starts in secure mode (``AT_SECURE``): setuid or setgid to another
user or group, or carrying file capabilities (``security.capability``), for which the loader ignores
``LD_PRELOAD``. A ``#!`` script is judged by its interpreter (``/usr/bin/env NAME`` by NAME on PATH).
"""

from __future__ import annotations

import os
import shutil
import stat
import struct

PT_INTERP = 3


class NotReachable(Exception):
    """The interposer cannot reach the program (the message says why and what to do)."""


def check_reachable(program: str, *, _depth: int = 0) -> str:
    """The path to execute ``program`` by (found on PATH, symlinks kept: a venv's ``python`` must stay the
    venv's); NotReachable if LD_PRELOAD would not reach it."""
    found = program if "/" in program else shutil.which(program)
    if found is None or not os.path.exists(found):
        raise NotReachable(f"{program}: no such program")
    path = os.path.realpath(found)
    st = os.stat(path)
    if (st.st_mode & stat.S_ISUID and st.st_uid != os.geteuid()) or (
            st.st_mode & stat.S_ISGID and st.st_gid != os.getegid()):
        raise NotReachable(f"{path} is setuid/setgid: the loader ignores LD_PRELOAD for it, so ufsgmem run "
                           "cannot reach it")
    try:
        if os.getxattr(path, "security.capability"):
            raise NotReachable(f"{path} has file capabilities: the loader ignores LD_PRELOAD for it")
    except OSError:
        pass
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(b"#!") and _depth < 4:
            words = head[2:].split(b"\n", 1)[0].split()
            if not words:
                raise NotReachable(f"{path}: empty #! line")
            interp = os.fsdecode(words[0])
            if os.path.basename(interp) == "env" and len(words) > 1 and not words[1].startswith(b"-"):
                interp = os.fsdecode(words[1])
            check_reachable(interp, _depth=_depth + 1)
            return found
        if head[:4] != b"\x7fELF":
            raise NotReachable(f"{path} is neither an ELF program nor a #! script")
        if not _has_interp(f, head):
            raise NotReachable(f"{path} is statically linked (no program interpreter): LD_PRELOAD cannot reach "
                               "it, so ufsgmem run would not be emulating anything; link it dynamically")
    return found


def _has_interp(f, head: bytes) -> bool:
    is64, little = head[4] == 2, head[5] == 1
    end = "<" if little else ">"
    if is64:
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
    else:
        phoff, = struct.unpack_from(end + "I", head, 28)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(end + "I", table, i * phentsize)
        if p_type == PT_INTERP:
            return True
    return False
