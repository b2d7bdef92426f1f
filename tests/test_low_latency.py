"""``ufsgmem mount --low-latency``: a 0 µs CPU latency limit held while requests flow, and only then.

The hold's own logic runs against a plain file standing in for ``/dev/cpu_dma_latency`` (every value it
writes is appended, so the file is the history). The mount test reads the limit the kernel has in force,
so it needs nobody else on the machine to hold one; it says so and skips otherwise.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys

import pytest

from fusefix import Gmem, mounted, requires_fuse, wait_for
from ufsgmem.fuse.latency import DEVICE, NO_LIMIT, LatencyHold, current_limit


def written(path: str) -> list[int]:
    with open(path, "rb") as f:
        data = f.read()
    return [v for (v,) in struct.iter_unpack("=i", data)]


def test_a_request_raises_the_limit_and_a_quiet_window_drops_it(tmp_path):
    device = str(tmp_path / "cpu_dma_latency")
    open(device, "wb").close()
    hold = LatencyHold(window=0.05, device=device)
    hold.start()
    try:
        assert written(device) == [NO_LIMIT], "opening asks for nothing"
        hold.touch()
        hold.touch()
        assert written(device) == [NO_LIMIT, 0], "one write a burst, not one a request"
        wait_for(lambda: not hold.status()["held"], 10, "the limit to go after a quiet window")
        assert written(device) == [NO_LIMIT, 0, NO_LIMIT]
        hold.touch()
        # what the device was told, not whether the 50 ms window is still open when we look
        assert written(device)[-1] == 0
        assert {k: hold.status()[k] for k in ("window_s", "raised")} == {"window_s": 0.05, "raised": 2}
    finally:
        hold.close()
    hold.touch()  # a request racing the end of the server changes nothing
    assert written(device) == [NO_LIMIT, 0, NO_LIMIT, 0]


def test_a_refused_write_turns_the_hold_off_without_failing_the_request(tmp_path):
    device = str(tmp_path / "cpu_dma_latency")
    open(device, "wb").close()
    hold = LatencyHold(window=60, device=device)
    os.close(hold._fd)  # the write that raises the limit now fails with EBADF
    hold._fd = os.open(device, os.O_RDONLY)
    try:
        hold.touch()  # must not raise: the request it rides on goes on
        hold.touch()
        assert hold.status()["held"] is False and hold.status()["raised"] == 0
    finally:
        hold.close()


def test_a_device_it_cannot_open_is_an_error_that_says_so(tmp_path):
    with pytest.raises(OSError) as exc:
        LatencyHold(device=str(tmp_path / "missing"))
    assert exc.value.errno == errno.ENOENT and "--low-latency" in str(exc.value)
    with pytest.raises(ValueError):
        LatencyHold(window=0, device=DEVICE)


def skip_unless_our_limit_is_visible() -> None:
    """Skip unless a mount's hold can be told apart: the device is writable and nobody else holds a limit."""
    if not os.access(DEVICE, os.W_OK):
        pytest.skip(f"{DEVICE} is not writable here (needs root)")
    if current_limit() != NO_LIMIT:
        pytest.skip(f"another process holds a CPU latency limit ({current_limit()} µs): cannot tell ours apart")


@requires_fuse
def test_the_mount_holds_the_limit_only_while_requests_flow():
    skip_unless_our_limit_is_visible()
    with mounted(low_latency=True) as mount:
        mount.ctl("create vm size=1M flags=mmap|init_shared")
        g = Gmem(mount, "vm", 1 << 20)
        seen = set()
        for _ in range(20):  # a request and the read right after it: the window (0.2 s) is far longer
            g.convert(0, 4096, private=True)
            seen.add(current_limit())
            g.convert(0, 4096, private=False)
        assert 0 in seen, f"the limit never held during requests: {seen}"
        wait_for(lambda: current_limit() == NO_LIMIT, 10, "the limit to go once requests stop")
        st = g.status()["low_latency"]
        assert st["window_s"] == 0.2 and st["raised"] >= 1, st
        shown = subprocess.run([sys.executable, "-m", "ufsgmem", "status", g.path("")], capture_output=True,
                               text=True, check=True).stdout
        assert "low latency (mount --low-latency): CPU latency limit" in shown, shown
    assert current_limit() == NO_LIMIT, "the limit outlived the server"


def test_without_the_option_the_status_says_so(gmem):
    assert gmem(1 << 20).status()["low_latency"] is None


def test_the_option_is_in_the_help():
    out = subprocess.run([sys.executable, "-m", "ufsgmem", "mount", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--low-latency" in out


@requires_fuse
def test_requests_the_compiled_path_serves_keep_the_limit_held():
    """Conversions served in C (fastpath.c) never call the hold's Python hook: C notes their time, and the
    hold's expiry reads it, so the limit stays held for as long as they flow, well past one window."""
    import time

    from test_fastpath import convert
    skip_unless_our_limit_is_visible()
    with mounted(low_latency=True) as mount:
        mount.ctl("create vm size=1M flags=mmap|init_shared")
        g = Gmem(mount, "vm", 1 << 20)
        fd = os.open(g.path("mem"), os.O_RDWR)
        try:
            start, held_late = time.monotonic(), []
            while time.monotonic() - start < 0.6:  # three windows of requests, no pause
                assert convert(fd, 0, 4096, private=True)[0] == 0
                assert convert(fd, 0, 4096, private=False)[0] == 0
                if time.monotonic() - start > 0.3:
                    held_late.append(current_limit() == 0)
        finally:
            os.close(fd)
        hot = g.status()["hot_path"]
        assert held_late and all(held_late), "the limit lapsed while compiled requests flowed"
        assert hot["ioctl"]["compiled"] > 0, hot  # (the create before them raised the limit, in Python)
    assert current_limit() == NO_LIMIT, "the limit outlived the server"
