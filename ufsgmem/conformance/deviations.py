"""The documented deviations: where ufsgmem (or the in-process core) may observe something the kernel does
not, and why. Nothing else may differ.

Each entry names a case and, where only part of its observation differs, the keys that may differ; the
other keys must still agree. An entry whose case *agrees* is an error too (the list would be stale), so
this file can only ever describe the current behaviour.

A program under ``ufsgmem run`` meets the same files as a plain mount, but the interposer sees calls FUSE
never sees. A mount entry that says ``run=`` (how run gives the kernel's answer) must *agree* under run,
and every other mount entry must still differ there: the run subject (:mod:`.under_run`) is judged
against this one list, and ``docs/compat.md`` lists the entries it removes from what it observed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    reason: str
    keys: tuple[str, ...] | None = None  # None: the whole observation may differ
    run: str | None = None  # a mount deviation ufsgmem run removes: how it gives the kernel's answer


HUGE_SIZES = Deviation(
    "the kernel allocates nothing at creation and has no upper bound; a ufsgmem backend maps the whole file "
    "into the server's address space at creation, so a size beyond the 128 TiB user address space is ENOMEM",
    keys=("0x4000000000000000", "0x7ffffffffffff000"))

MAP_PRIVATE_ALLOWED = Deviation(
    "FUSE never sees mmap(2), so MAP_PRIVATE cannot be refused; a private mapping's page fills obey the "
    "same attribute checks (SIGBUS on private pages)",
    run="the interposer sees mmap(2) and refuses MAP_PRIVATE of its files with EINVAL")

#: Deviations of the in-process core, which has no file: only rules it models are compared.
CORE: dict[str, Deviation] = {
    "create_huge_sizes": HUGE_SIZES,
}

#: Deviations of a ufsgmem mount: what FUSE cannot express, each with the mechanism that prevents it.
MOUNT: dict[str, Deviation] = {
    "create_huge_sizes": HUGE_SIZES,
    "create_reserved_words": Deviation(
        "the binary create request gives reserved[0] the HugeTLB work's meaning (page_order: 0, 9 or 18) and "
        "refuses other reserved words that are not 0, so a future field cannot be silently ignored; "
        "mainline 6.18 never reads them", keys=("reserved[0]=1", "reserved[5]=1"),
        run="the interposer answers KVM_CREATE_GUEST_MEMFD from the struct's size and flags and, as mainline, "
            "never reads the reserved words"),
    "reopen_via_proc": Deviation(
        "mem is a real file with a path: /proc/self/fd/N reopens it, where the kernel's anonymous inode "
        "cannot be reopened (ENXIO)",
        run="the interposer refuses open(2) of /proc/PID/fd/N naming one of its files with ENXIO"),
    "fstatfs_type": Deviation(
        "a FUSE mount reports FUSE_SUPER_MAGIC; guest_memfd lives on the anon_inode filesystem "
        "(ANON_INODE_FS_MAGIC 0x09041934 on 6.18, not a GUEST_MEMFD_MAGIC of its own)",
        run="the interposer's fstatfs(2) reports ANON_INODE_FS_MAGIC for its files"),
    "mmap_cow[mmap]": MAP_PRIVATE_ALLOWED,
    "mmap_cow[mmap|init_shared]": MAP_PRIVATE_ALLOWED,
    "mmap_not_supported[0]": Deviation(
        "FUSE never sees mmap(2), and the mount lets direct-I/O files be mapped (FUSE_DIRECT_IO_ALLOW_MMAP is "
        "granted per connection, for mem's read(2)/write(2) to be refusable), so mapping a file created "
        "without MMAP succeeds; every access to it is SIGBUS, since each page fill is refused",
        run="the interposer sees mmap(2) and refuses a file created without MMAP with ENODEV"),
}

#: The mount's deviations ufsgmem run removes (its answers are the kernel's there), and those it keeps.
REMOVED_BY_RUN: dict[str, Deviation] = {name: d for name, d in MOUNT.items() if d.run}
RUN: dict[str, Deviation] = {name: d for name, d in MOUNT.items() if not d.run}

BY_SUBJECT = {"core": CORE, "ufsgmem": MOUNT, "run": RUN}
#: Per subject: listed deviations of another subject it must agree on (the verdict says it removes them).
REMOVED_BY_SUBJECT = {"run": REMOVED_BY_RUN}
