"""Keep idle CPUs out of deep sleep while requests flow: ``ufsgmem mount --low-latency``.

Why: a FUSE request wakes a server thread, and its reply wakes the caller. When the CPU that has to run
the woken thread is idle, the wake-up costs what leaving that CPU's idle state costs. On a VM whose idle
vCPUs halt into the host, that is tens of µs a wake-up: on these machines (booted with
``haltpoll.guest_halt_poll_ns=0``, so an idle vCPU halts at once) a pipe ping-pong between two processes
on two vCPUs takes ~80 µs, and ~8 µs while a CPU latency limit of 0 µs is in force, because idle CPUs then
poll instead of halting. A conversion is one FUSE request, a dirty one two (the ioctl and the write-back
it waits for), and not every wake-up finds its CPU idle (the scheduler often runs the woken thread on the
waker's CPU), so the gain on a 4 KiB round trip is smaller: 10-30 % here (docs/performance.md).

How: the kernel's PM QoS CPU latency request, ``/dev/cpu_dma_latency``: a process writes a limit in µs as
a 32-bit integer and the limit holds while that file stays open (reading it gives the limit in force,
the tightest of all requests). The server opens it once (root only, so the option fails at mount time,
with the reason, rather than silently doing nothing), asks for 0 µs on the first request after a quiet
spell, and goes back to no limit once no request came for :data:`WINDOW` seconds. So idle CPUs poll
while a VMM is converting, not for the life of the mount.

Cost, and why it is opt-in: while held, *every* idle CPU of the machine polls (the kernel keeps one CPU
latency limit for all CPUs), i.e. burns CPU time that a halted vCPU would give back to the host. Also,
on a machine whose idle states are already cheap to leave (bare metal with shallow C-states, or a guest
that polls before halting) it gains little.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time

#: the CPU latency QoS device (drivers' name for it is historical: it bounds every CPU's wake-up latency)
DEVICE = "/dev/cpu_dma_latency"
#: PM_QOS_CPU_LATENCY_DEFAULT_VALUE: a request of this value constrains nothing
NO_LIMIT = 2_000_000_000
#: seconds without a request after which the limit goes (a conversion burst keeps it; an idle mount not)
WINDOW = 0.2

_S32 = struct.Struct("=i")
log = logging.getLogger("ufsgmem.fuse")


def current_limit(device: str = DEVICE) -> int:
    """The CPU latency limit in force now, in µs (NO_LIMIT: none), the tightest of every holder's."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _S32.unpack(os.pread(fd, _S32.size, 0))[0]
    finally:
        os.close(fd)


class LatencyHold:
    """A CPU latency request of 0 µs, held from a request (:meth:`touch`) until ``window`` quiet seconds.

    ``touch`` is called by every request and costs one clock read and a compare; only the first request
    after a quiet spell writes to the device. A daemon thread drops the limit when the window passes.
    """

    def __init__(self, window: float = WINDOW, device: str = DEVICE):
        if window <= 0:
            raise ValueError(f"the window must be positive, not {window}")
        try:
            self._fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (it needs root: mount as root, or leave --low-latency out)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
            raise OSError(exc.errno, f"--low-latency: cannot open {device}{hint}: {exc.strerror}") from None
        self.window = window
        self.raised = 0          # how many times the limit was raised (one per burst of requests)
        self._held = False
        self._last = 0.0         # time.monotonic() of the latest request
        self._closed = False
        self._lock = threading.Lock()
        self._armed = threading.Event()
        self._fast = None        # the session's compiled path (``attach``): it serves requests too
        self._write(NO_LIMIT)
        self._thread = threading.Thread(target=self._expire, name="ufsgmem-latency", daemon=True)

    def attach(self, fast) -> None:
        """Requests the compiled path (``fastpath.FastPath``) serves keep the hold too: C passes requests
        to ``touch`` while the hold is not held, and notes the time of those it serves while it is."""
        self._fast = fast
        fast.hold(True)

    def _held_now(self, held: bool) -> None:
        self._held = held
        if self._fast is not None:
            self._fast.held(held)

    def _latest(self) -> float:
        return self._last if self._fast is None else max(self._last, self._fast.last_request())

    def start(self) -> None:
        """Start the thread that drops the limit (start it with the loop's signals blocked)."""
        self._thread.start()

    def touch(self) -> None:
        """A request arrived: make sure the limit is held for the next ``window`` seconds. Never raises:
        a latency hint must not fail the request it rides on (a refused write turns the hold off)."""
        self._last = time.monotonic()
        if not self._held:
            with self._lock:
                if not self._held and not self._closed:
                    try:
                        self._write(0)
                    except OSError as exc:
                        log.warning("--low-latency: cannot raise the CPU latency limit, giving up: %s", exc)
                        self._closed = True
                        return
                    self._held_now(True)
                    self.raised += 1
                    self._armed.set()

    def _expire(self) -> None:
        while True:
            self._armed.wait()
            with self._lock:
                if self._closed:
                    return
                left = self._latest() + self.window - time.monotonic()
                if left <= 0:  # quiet for a whole window: let the CPUs sleep again
                    try:
                        self._write(NO_LIMIT)
                    except OSError as exc:  # cannot happen on the real device; closing ends the request too
                        log.warning("--low-latency: cannot drop the CPU latency limit: %s", exc)
                    self._held_now(False)
                    self._armed.clear()
                    continue
            time.sleep(left)

    def _write(self, limit: int) -> None:
        os.write(self._fd, _S32.pack(limit))

    def status(self) -> dict:
        return {"window_s": self.window, "held": self._held, "raised": self.raised}

    def close(self) -> None:
        """Drop the request for good (closing the device ends it; the kernel does that too if we die)."""
        with self._lock:
            if self._fd < 0:
                return
            self._closed = True
            self._held_now(False)
            self._armed.set()
            os.close(self._fd)
            self._fd = -1
