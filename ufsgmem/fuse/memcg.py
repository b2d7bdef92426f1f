"""Is this server in a memory cgroup with a limit? If so, leave it (or say why not): docs/reliability.md.

The server writes back dirty pages for the processes that map its files, and a write-back can allocate
backend memory. If the server shares a *limited* memory cgroup with those processes, reclaim in that cgroup
can wait for a write-back that only the server can serve while the server waits for memory. Measured on
Linux 6.18 with cgroup v1 (tests/test_memcg.py): a 256 MiB file, server and mapper in one cgroup limited
to 160-240 MiB, hung every time (a server thread in ``folio_wait_writeback`` under
``try_to_free_mem_cgroup_pages``, the mapper in its fault) until the FUSE connection was aborted; with 64
or 128 MiB the OOM killer took the server. With the server outside, a mapper limited to 64 MiB dirtied
1 GiB and every byte came back.

:func:`memory_limits` reads the calling process's memory cgroup from ``/proc/self/cgroup`` and the cgroup
mounts from ``/proc/self/mountinfo``, and walks from that cgroup up to the root of its hierarchy: a cgroup v1
``memory.limit_in_bytes`` or a cgroup v2 ``memory.max`` anywhere on the way counts (a limit on an ancestor
binds the server too). Every input can be given instead, so a fake directory tree can be checked; nothing
raises for what it cannot read. When ``PR_SET_IO_FLUSHER`` (which would make sharing safe) is refused,
``server.harden`` calls :func:`leave_limits` at start: the server moves to the parent of the topmost limited
cgroup and keeps the tightest limit as its memory cap; where it cannot (a container that sees only its own
subtree), it logs :func:`limit_warning`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

#: A v1 limit at or above this is "no limit": the kernel prints PAGE_COUNTER_MAX pages (9223372036854771712
#: with 4 KiB pages), which differs with the page size.
V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryLimit:
    """A limit on the way from a process's memory cgroup to the root."""

    cgroup: str     # the cgroup's path inside its hierarchy, e.g. "/machine/vm0"
    directory: str  # where it is in the filesystem
    knob: str       # "memory.limit_in_bytes" (v1) or "memory.max" (v2)
    limit: int      # bytes


def _unescape(field: str) -> str:
    r"""A path as mountinfo prints it (``\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts(mountinfo: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The memory cgroup mounts in ``mountinfo`` text: ``(v1, v2)``, each a list of ``(root, mountpoint)``.
    v1 counts only hierarchies with the memory controller; v2 every cgroup2 mount."""
    v1, v2 = [], []
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3:
            continue
        root, mountpoint, fstype, options = _unescape(parts[3]), _unescape(parts[4]), tail_parts[0], tail_parts[2]
        if fstype == "cgroup" and "memory" in options.split(","):
            v1.append((root, mountpoint))
        elif fstype == "cgroup2":
            v2.append((root, mountpoint))
    return v1, v2


def memory_cgroups(proc_cgroup: str) -> tuple[str | None, str | None]:
    """``(v1, v2)``: the process's memory cgroup path in a v1 memory hierarchy and its v2 path, from the
    text of ``/proc/PID/cgroup`` (either may be None)."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _directory(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """Where cgroup ``path`` is in the filesystem: under the mount whose root is its longest prefix
    (a container often mounts only its own subtree, whose root is then not "/")."""
    best = None
    for root, mountpoint in mounts:
        rel = path.lstrip("/") if root == "/" else os.path.relpath(path, root)
        if rel == ".":
            rel = ""
        elif rel == ".." or rel.startswith("../"):
            continue
        if best is None or len(root) > len(best[0]):
            best = (root, os.path.join(mountpoint, rel) if rel else mountpoint)
    return None if best is None else best[1]


def _read_limit(directory: str, knob: str) -> int | None:
    try:
        with open(os.path.join(directory, knob)) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if knob == "memory.limit_in_bytes" and value >= V1_UNLIMITED else value


def _walk(path: str, directory: str, knob: str) -> list[MemoryLimit]:
    """Limits from the cgroup ``path`` (at ``directory``) up to the top of the mounted hierarchy."""
    found = []
    while True:
        if os.path.isdir(directory):
            limit = _read_limit(directory, knob)
            if limit is not None:
                found.append(MemoryLimit(path, directory, knob, limit))
        if path in ("/", ""):
            return found
        parent = os.path.dirname(directory.rstrip("/"))
        if not os.path.exists(os.path.join(parent, "cgroup.procs")):
            return found  # the top of what is mounted (a container's own subtree)
        path, directory = os.path.dirname(path.rstrip("/")) or "/", parent


def _read_proc(proc_cgroup: str | None, mountinfo: str | None) -> tuple[str, str] | None:
    try:
        if proc_cgroup is None:
            with open("/proc/self/cgroup") as f:
                proc_cgroup = f.read()
        if mountinfo is None:
            with open("/proc/self/mountinfo") as f:
                mountinfo = f.read()
    except OSError:
        return None
    return proc_cgroup, mountinfo


def memory_cgroup_directories(proc_cgroup: str | None = None,
                              mountinfo: str | None = None) -> list[tuple[int, str, str]]:
    """``(version, path, directory)`` of the memory cgroups of the process whose ``/proc/PID/cgroup`` text is
    ``proc_cgroup`` (default: this process): its v1 memory cgroup and its v2 cgroup, each where mounted.
    ``mountinfo`` (default ``/proc/self/mountinfo``) says where the hierarchies are."""
    texts = _read_proc(proc_cgroup, mountinfo)
    if texts is None:
        return []
    v1_path, v2_path = memory_cgroups(texts[0])
    v1_mounts, v2_mounts = cgroup_mounts(texts[1])
    found = []
    for version, path, mounts in ((1, v1_path, v1_mounts), (2, v2_path, v2_mounts)):
        directory = None if path is None else _directory(path, mounts)
        if directory is not None:
            found.append((version, path, directory))
    return found


def memory_limits(proc_cgroup: str | None = None, mountinfo: str | None = None) -> list[MemoryLimit]:
    """Every memory limit that binds the process whose ``/proc/PID/cgroup`` text is ``proc_cgroup``
    (default: this process), nearest first, v1 then v2."""
    found = []
    for version, path, directory in memory_cgroup_directories(proc_cgroup, mountinfo):
        found += _walk(path, directory, "memory.limit_in_bytes" if version == 1 else "memory.max")
    return found


def _size(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def limit_warning(proc_cgroup: str | None = None, mountinfo: str | None = None) -> str | None:
    """One line for the server's log when its memory cgroup (or an ancestor) has a limit, else None.
    Names the tightest limit: the one reclaim runs against first."""
    limits = memory_limits(proc_cgroup, mountinfo)
    if not limits:
        return None
    tightest = min(limits, key=lambda lim: lim.limit)
    return (f"this server runs under a memory limit ({tightest.knob} = {_size(tightest.limit)} on cgroup "
            f"{tightest.cgroup}): if processes that map its files share that cgroup, reclaim there can wait for "
            f"write-backs only this server serves and hang them all; run the server in its own memory cgroup "
            f"(docs/reliability.md)")


def leave_limits(proc_cgroup: str | None = None, mountinfo: str | None = None) -> tuple[list[MemoryLimit], str | None]:
    """Move this process out of every limited memory cgroup, into the parent of the topmost limited one
    (limits bind a whole subtree, so that is the nearest place none applies). Returns the limits it was
    under and None, or the limits and why it could not leave them (a container that sees only its own
    subtree, no permission, cgroup v2's rule against processes in inner cgroups)."""
    limits = memory_limits(proc_cgroup, mountinfo)
    if not limits:
        return [], None
    for knob in {lim.knob for lim in limits}:
        top = [lim for lim in limits if lim.knob == knob][-1]  # nearest first: the last is the topmost
        target = os.path.dirname(top.directory.rstrip("/"))
        if top.cgroup in ("/", "") or not os.path.exists(os.path.join(target, "cgroup.procs")):
            return limits, f"nowhere to go: {top.cgroup} is the top of the hierarchy this server sees"
        try:  # no O_CREAT: only ever into a cgroup's own file
            fd = os.open(os.path.join(target, "cgroup.procs"), os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            return limits, f"cannot move to {target}: {exc.strerror}"
    if proc_cgroup is None:  # this very process: see where it ended up (a fake tree cannot tell)
        left = memory_limits()
        if left:
            return limits, f"still under {left[0].knob} = {_size(left[0].limit)} on {left[0].cgroup} after moving"
    return limits, None
