"""A create preallocating in the server's worker thread does not stop the mount: other files keep being
served while it is in flight. The server log reports preallocation progress.

Deterministic, no timing: the server's create test hook (``ufsgmem.fuse.creating``) blocks each create on
a FIFO before it allocates. Opening the FIFO for writing returns only once the server's worker has opened
it for reading, i.e. once the create is in flight; writing one byte lets it go on.
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from fusefix import mounted, requires_fuse
from ufsgmem.fuse import creating

pytestmark = [requires_fuse, pytest.mark.fuse]
SZ_2M = 2 << 20


def release(gate: str) -> None:
    with open(gate, "wb") as f:  # blocks until a create waits on the gate
        f.write(b"x")


def test_other_files_are_served_while_a_create_is_in_flight(tmp_path, monkeypatch):
    gate = str(tmp_path / "gate")
    os.mkfifo(gate)
    monkeypatch.setenv(creating.GATE_ENV, gate)
    with mounted() as mount:
        first = threading.Thread(target=mount.ctl, args=("create first size=64K flags=mmap|init_shared",))
        first.start()
        release(gate)
        first.join()

        outcome = {}

        def create_big():
            try:
                mount.ctl("create big size=64M flags=mmap|init_shared")
                outcome["big"] = "ok"
            except OSError as exc:
                outcome["big"] = exc
        big = threading.Thread(target=create_big)
        big.start()
        gate_fd = os.open(gate, os.O_WRONLY)  # returns once the big create waits in the worker thread
        try:
            served = {}

            def serve_others():
                with open(os.path.join(mount.path, "first", "status")) as f:
                    served["status"] = json.load(f)
                served["names"] = sorted(os.listdir(mount.path))
            other = threading.Thread(target=serve_others, daemon=True)
            other.start()
            other.join(timeout=60)  # a safety net only: a blocked loop would never answer
            assert not other.is_alive(), "the loop stopped serving while a create was in flight"
            assert served["status"]["size"] == 64 << 10
            assert served["names"] == ["ctl", "first"], "the file in creation is not visible yet"
            assert "big" not in outcome, "the create finished before the gate opened"
        finally:
            os.write(gate_fd, b"x")
            os.close(gate_fd)
            big.join()
        assert outcome["big"] == "ok"
        assert os.stat(os.path.join(mount.path, "big", "mem")).st_size == 64 << 20
        for name in ("first", "big"):
            mount.ctl(f"destroy {name}")


def test_preallocation_progress_is_logged(hugepages):
    with hugepages(SZ_2M, 8), mounted() as mount:
        mount.ctl(f"create huge size={8 * SZ_2M} flags=mmap backend=hugetlb page_size=2M")
        try:
            log = mount.log
            assert "create huge: 16M on hugetlb" in log
            assert "create huge: preallocated 16M of 16M (100%)" in log
        finally:
            mount.ctl("destroy huge")
