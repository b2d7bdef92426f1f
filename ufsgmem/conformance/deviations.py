"""The documented deviations: where ufsgmem (or the in-process core) may observe something the kernel does
not, and why. Nothing else may differ.

Each entry names a case and, where only part of its observation differs, the keys that may differ; the
other keys must still agree. An entry whose case *agrees* is an error too (the list would be stale), so
this file can only ever describe the current behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    reason: str
    keys: tuple[str, ...] | None = None  # None: the whole observation may differ


HUGE_SIZES = Deviation(
    "the kernel allocates nothing at creation and has no upper bound; a ufsgmem backend maps the whole file "
    "into the server's address space at creation, so a size beyond the 128 TiB user address space is ENOMEM",
    keys=("0x4000000000000000", "0x7ffffffffffff000"))

#: Deviations of the in-process core, which has no file: only rules it models are compared.
CORE: dict[str, Deviation] = {
    "create_huge_sizes": HUGE_SIZES,
}

READ_FILL = (
    "FUSE cannot tell a read(2) from a page-fault fill of a mapping (both are the same FUSE READ, and pages "
    "already cached never reach the server), so read(2) of shared pages succeeds and of private pages fails "
    "with EIO; private bytes are never returned")
FALLOCATE_VIA_CTL = (
    "before FUSE forwards a fallocate (pyfuse3 has no handler for it anyway) the VFS asks the server to strip "
    "the security.capability xattr, which ufsgmem refuses with EINVAL, the refusal that makes write(2) "
    "EINVAL. Allocate and punch hole are served by the NAME/ctl requests `allocate` and `punch_hole`, which "
    "agree with the kernel case for case")

#: Deviations of a ufsgmem mount: what FUSE cannot express, each with the mechanism that prevents it.
MOUNT: dict[str, Deviation] = {
    "create_huge_sizes": HUGE_SIZES,
    "create_reserved_words": Deviation(
        "the binary create request gives reserved[0] the HugeTLB work's meaning (page_order: 0, 9 or 18) and "
        "refuses other reserved words that are not 0, so a future field cannot be silently ignored; "
        "mainline 6.18 never reads them", keys=("reserved[0]=1", "reserved[5]=1")),
    "file_read_write[mmap]": Deviation(READ_FILL, keys=("read",)),
    "file_read_write[mmap|init_shared]": Deviation(READ_FILL, keys=("read",)),
    "reopen_via_proc": Deviation(
        "mem is a real file with a path: /proc/self/fd/N reopens it, where the kernel's anonymous inode "
        "cannot be reopened (ENXIO)"),
    "fstatfs_type": Deviation(
        "a FUSE mount reports FUSE_SUPER_MAGIC; guest_memfd lives on the anon_inode filesystem "
        "(ANON_INODE_FS_MAGIC 0x09041934 on 6.18, not GUEST_MEMFD_MAGIC as the reference guessed)"),
    "mmap_cow[mmap]": Deviation(
        "FUSE never sees mmap(2), so MAP_PRIVATE cannot be refused; a private mapping's page fills obey the "
        "same attribute checks (SIGBUS on private pages)"),
    "mmap_cow[mmap|init_shared]": Deviation(
        "FUSE never sees mmap(2), so MAP_PRIVATE cannot be refused; a private mapping's page fills obey the "
        "same attribute checks (SIGBUS on private pages)"),
    **{f"fallocate_modes[{key}]": Deviation(
        "fallocate(2) modes that FUSE forwards (0, ZERO_RANGE) are EINVAL, not EOPNOTSUPP: " + FALLOCATE_VIA_CTL,
        keys=("0", "ZERO_RANGE", "KEEP|ZERO_RANGE")) for key in ("0", "mmap", "mmap|init_shared")},
    "fallocate_syscall[mmap|init_shared]": Deviation("fallocate(2) on mem is EINVAL: " + FALLOCATE_VIA_CTL),
}

BY_SUBJECT = {"core": CORE, "ufsgmem": MOUNT}
