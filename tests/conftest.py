"""Shared fixtures: capabilities the tests set up themselves (huge pages), and the backends to run over."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import settings

from ufsgmem import hugepages as hugepages_lib

# Hypothesis draws the same examples on every machine, so a property test that passes here passes in CI,
# and a failure seen anywhere is seen again by rerunning it (Hypothesis derandomizes by itself when it sees
# a CI variable; this makes developers' runs the same as CI's). HYPOTHESIS_PROFILE=explore draws fresh
# random examples, for hunting bugs on purpose.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

SZ_2M = 2 << 20
SZ_1G = 1 << 30


@contextlib.contextmanager
def reserved_hugepages(size: int, count: int):
    """Add ``count`` huge pages of ``size`` to the pool, and take exactly those away again afterwards.

    Skips (with the reason) only where the machine truly cannot: no sysfs knob, not root, or the kernel
    could not find the memory even after compaction (see :mod:`ufsgmem.hugepages`).
    """
    reason = hugepages_lib.unavailable_reason(size)
    if reason:
        pytest.skip(reason)
    with hugepages_lib.reserved(size, count) as got:
        if got < count:
            pytest.skip(f"the kernel gave {got} of {count} {size >> 20} MiB huge pages (memory fragmented)")
        yield


@pytest.fixture
def hugepages():
    """``with hugepages(SZ_2M, 4): ...`` reserves pages for the block and gives them back after."""
    return reserved_hugepages
