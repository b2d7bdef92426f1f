"""Testing kit for VMM developers: guest_memfd files behind one API, and a pytest plugin.

Purpose: put code that uses guest_memfd (a VMM's memory management: conversion on
``KVM_EXIT_MEMORY_FAULT``, discard by punch-hole, host mappings, device pins) under test on a ufsgmem mount,
which has in-place conversion today, and run the *same* test on the machine's real guest_memfd, which
passes or skips with the precise reason the kernel gives. See ``docs/testing-vmms.md``.

* :mod:`ufsgmem.testing.gmemfd` — :func:`open_gmem` (targets ``"ufsgmem"``, ``"ufsgmem-no-inplace"``,
  ``"kernel"``), the :class:`GmemFd` interface (``set_memory_attributes``, ``fallocate``, ``mmap``,
  ``pin``/``unpin``, ``status``, ``fileno``, ``close``), :func:`missing_feature` and :func:`expect_sigbus`.
* :mod:`ufsgmem.testing.plugin` — the pytest plugin, installed as the ``pytest11`` entry point ``ufsgmem``:
  fixtures ``ufsgmem_mount``, ``ufsgmem_file``, ``ufsgmem_hugepages``, ``gmem_expect_sigbus`` and the
  parametrised ``gmem_target``; markers ``gmem_requires`` and ``gmem_targets``. Nothing is autouse.

Caveat: touching private memory (or memory past the end of the file) raises SIGBUS in the calling process,
which kills it; do such accesses through :func:`expect_sigbus`.
"""

from .gmemfd import (  # noqa: F401
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FEATURES, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    PAGE_SIZE, PRIVATE, SHARED, TARGETS, ChildOutcome, GmemFd, GmemMapping, GuestMemfdError, KernelGmemFd,
    UfsgmemGmemFd, UfsgmemMount, expect_sigbus, fuse_unavailable_reason, header_constant,
    kernel_unavailable_reason, missing_feature, mounted, open_gmem, parse_flags,
)

__all__ = [
    "TARGETS", "FEATURES", "SHARED", "PRIVATE", "PAGE_SIZE", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE",
    "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED", "GuestMemfdError", "GmemFd", "GmemMapping",
    "UfsgmemGmemFd", "KernelGmemFd", "UfsgmemMount", "open_gmem", "mounted", "missing_feature",
    "fuse_unavailable_reason", "kernel_unavailable_reason", "header_constant", "parse_flags",
    "expect_sigbus", "ChildOutcome",
]
