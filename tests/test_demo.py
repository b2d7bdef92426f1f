"""``ufsgmem demo`` end to end: it passes its own checks and leaves no mount, no huge pages and no process
behind, also when interrupted with Ctrl-C in the middle."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from clientfix import require_fuse, ufsgmem
from ufsgmem.fuse import server

pytestmark = [pytest.mark.fuse, pytest.mark.slow]


def _hugepages() -> int:
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") as f:
        return int(f.read())


def _left_behind(out: str) -> list[str]:
    """This demo's mount point if still mounted, and its mapper process if still alive (found from the
    lines the demo printed, so another demo running on the machine at the same time does not count)."""
    left = []
    mountpoint = re.search(r"^demo: mounted ufsgmem on (\S+)$", out, re.M)
    if mountpoint:
        if server.mount_type(mountpoint[1]) is not None:
            left.append(f"mount {mountpoint[1]}")
    for pid in set(re.findall(r"^mapper \(pid (\d+)\)", out, re.M)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"--mapper" in f.read():
                    left.append(f"mapper pid {pid}")
        except OSError:
            pass
    return left


def test_demo_runs_and_cleans_up(tmp_path):
    require_fuse()
    before_pages = _hugepages()
    done = ufsgmem("demo", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "=== ufsgmem demo summary ===" in out
    assert "SIGBUS         seen 3 of 3" in out and "killed by SIGBUS" in out
    assert "content checks 8/8 passed" in out and "EAGAIN with error_offset 0xa03000" in out
    assert _hugepages() == before_pages, "the demo must give its huge pages back"
    assert "demo: mounted ufsgmem on" in out and "mapper (pid" in out
    assert not _left_behind(out), "the demo must unmount and end its second process"
    if "backend hugetlb" not in out:
        assert "hugetlb unavailable" in out, "falling back to anon is reported"
    if "layout export skipped" not in out:
        assert (tmp_path / "out" / "layout-kvm.png").stat().st_size > 0


def test_demo_interrupted_cleans_up():
    """Ctrl-C (SIGINT to the foreground process group) once the file exists: all released, exit 130."""
    require_fuse()
    before_pages = _hugepages()
    proc = subprocess.Popen([sys.executable, "-m", "ufsgmem", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("demo: created"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    out = "".join(seen) + rest
    assert _hugepages() == before_pages, "the huge pages are given back"
    assert "demo: mounted ufsgmem on" in out and not _left_behind(out)
