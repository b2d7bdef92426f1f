"""``ufsgmem demo`` end to end: it passes its own checks and leaves no mount and no huge pages behind."""

from __future__ import annotations

import subprocess

import pytest

from clientfix import require_fuse, ufsgmem

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


def _hugepages() -> int:
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") as f:
        return int(f.read())


def _ufsgmem_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if "ufsgmem" in line.split()[0] or "ufsgmem-demo" in line]


def test_demo_runs_and_cleans_up(tmp_path):
    require_fuse()
    before_pages, before_mounts = _hugepages(), _ufsgmem_mounts()
    done = ufsgmem("demo", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "=== ufsgmem demo summary ===" in out
    assert "SIGBUS         seen 3 of 3" in out
    assert "content checks" in out and "EAGAIN with error_offset 0xa03000" in out
    assert _hugepages() == before_pages, "the demo must give its huge pages back"
    assert _ufsgmem_mounts() == before_mounts, "the demo must unmount"
    if "backend hugetlb" not in out:
        assert "hugetlb unavailable" in out, "falling back to anon is reported"
