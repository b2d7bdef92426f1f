"""The lifetimes ``ufsgmem run`` owns: a private mount, the program, and the proof the interposer loaded.

:func:`run_mount` mounts ufsgmem on a fresh directory for one program and removes it however things end:

* the program exits or crashes: ``run_program`` returns and the ``finally`` stops the server (SIGTERM by
  pid, which unmounts; SIGKILL, an aborted connection and a lazy unmount if it does not stop in time);
* ``run`` itself is killed (SIGKILL leaves no ``finally``): the server was started with
  ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel tells it when ``run`` dies and it unmounts (lazily, as
  root: files the program still holds do not keep the mount busy); the program was started with
  ``PR_SET_PDEATHSIG`` = SIGKILL, so nothing of the run stays behind; the server's wrapper
  (``ufsgmem.run.server``) removes the temporary directory once the mount is gone.

:func:`run_program` starts the program with the interposer preloaded and waits (bounded) for its
handshake: the interposer's constructor writes ``ufsgmem-shim PID`` to a pipe named by
``UFSGMEM_RUN_HANDSHAKE_FD`` before ``main`` runs. No handshake (EOF or time-out) means the loader did not
load it: the program is killed and :class:`RunError` says so, so a program never runs natively by mistake.
Signals ``run`` receives (INT, TERM, HUP) are passed on to the program; its exit status is returned
(128 + N when a signal N ended it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from ..fuse import abort
from ..mounts import FSTYPE, mount_type
from .elf import check_reachable
from .shim import build_shim

PR_SET_PDEATHSIG = 1
KERNELS = ("v8", "6.18")
HANDSHAKE = b"ufsgmem-shim"


class RunError(Exception):
    """``ufsgmem run`` cannot do what it was asked (the message says why)."""


def _die_with_parent(sig: int):
    """A preexec_fn: the kernel sends ``sig`` to the child when ``run`` dies (checked once more after
    setting it, in case ``run`` died first)."""
    parent = os.getpid()

    def set_it() -> None:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)
    return set_it


@contextlib.contextmanager
def run_mount(backend: str = "anon", *, timeout: float = 60.0):
    """Mount ufsgmem on a fresh temporary directory for one program; yield its path; always remove it."""
    top = tempfile.mkdtemp(prefix="ufsgmem-run-")
    mountpoint = os.path.join(top, "mnt")
    os.mkdir(mountpoint, 0o700)
    log_path = os.path.join(top, "server.log")
    read_end, write_end = os.pipe()
    proc = None
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ufsgmem.run.server", top, "--ready-fd", str(write_end), "--backend", backend,
                 mountpoint], pass_fds=(write_end,), start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=_die_with_parent(signal.SIGTERM))
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], timeout)
        message = os.read(read_end, 4096).decode(errors="replace").strip() if ready else ""
        if not message.startswith("ready"):
            raise RunError(f"cannot mount ufsgmem for the program: {message or 'the server did not answer'}"
                           f" ({_tail(log_path)})")
        yield mountpoint
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        clean = _stop(proc, mountpoint)
        if clean:
            shutil.rmtree(top, ignore_errors=True)  # the server removed it already; this is for a failed start
        else:
            print(f"ufsgmem run: the mount server did not stop cleanly; its log: {log_path}", file=sys.stderr)


def _tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-600:].strip() or "no log"
    except OSError:
        return "no log"


def _stop(proc: subprocess.Popen | None, mountpoint: str, timeout: float = 10.0) -> bool:
    """Stop our server by its pid and make sure nothing stays mounted; True if it went cleanly."""
    clean = True
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            clean = False
            proc.kill()
            proc.wait(5)
    if mount_type(mountpoint) is not None:
        clean = False
        with contextlib.suppress(OSError):
            abort.abort_mount(mountpoint)
        for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
            if shutil.which(command[0]) and subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                break
    return clean and (proc is None or proc.returncode == 0)


def program_env(shim: str, mountpoint: str, kernel: str, backend: str | None, handshake_fd: int) -> dict:
    env = dict(os.environ)
    env["LD_PRELOAD"] = shim + (" " + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env["UFSGMEM_RUN_MOUNT"] = mountpoint
    env["UFSGMEM_RUN_KERNEL"] = kernel
    env["UFSGMEM_RUN_HANDSHAKE_FD"] = str(handshake_fd)
    if backend:
        env["UFSGMEM_RUN_BACKEND"] = backend
    else:
        env.pop("UFSGMEM_RUN_BACKEND", None)
    return env


def run_program(argv: list[str], *, mount: str | None = None, backend: str | None = None, kernel: str = "v8",
                handshake_timeout: float = 30.0) -> int:
    """Run ``argv`` under the interposer against ``mount`` (a private mount if None); its exit status."""
    if not argv:
        raise RunError("no program to run")
    if kernel not in KERNELS:
        raise RunError(f"--kernel {kernel!r}: one of {', '.join(KERNELS)}")
    if backend is not None:
        from ..plugins import BACKENDS, available
        if backend not in available(BACKENDS):
            raise RunError(f"unknown backend {backend!r}; available: {', '.join(available(BACKENDS))}")
        if len(backend.encode()) > 31:
            raise RunError(f"backend name {backend!r} is longer than 31 bytes")
    program = check_reachable(argv[0])
    shim = build_shim()
    if mount is not None:
        mount = os.path.realpath(mount)
        if mount_type(mount) != FSTYPE:
            raise RunError(f"{mount} is not a ufsgmem mount")
        return _run(program, argv, shim, mount, kernel, backend, handshake_timeout)
    with run_mount(backend or "anon") as mountpoint:
        return _run(program, argv, shim, mountpoint, kernel, backend, handshake_timeout)


def _run(program: str, argv: list[str], shim: str, mountpoint: str, kernel: str, backend: str | None,
         handshake_timeout: float) -> int:
    read_end, write_end = os.pipe()
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    child: subprocess.Popen | None = None
    previous = {}

    def forward(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)
    try:
        for sig in forwarded:
            previous[sig] = signal.signal(sig, forward)
        child = subprocess.Popen([program, *argv[1:]], executable=program, pass_fds=(write_end,),
                                 env=program_env(shim, mountpoint, kernel, backend, write_end),
                                 preexec_fn=_die_with_parent(signal.SIGKILL))
        os.close(write_end)
        write_end = -1
        _await_handshake(child, read_end, argv[0], handshake_timeout)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
        return 128 - code if code < 0 else code
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _await_handshake(child: subprocess.Popen, read_end: int, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.startswith(HANDSHAKE) and b"\n" not in data:
        left = deadline - time.monotonic()
        ready = select.select([read_end], [], [], max(0.0, left))[0] if left > 0 else []
        chunk = os.read(read_end, 256) if ready else b""
        if not chunk:
            break
        data += chunk
    if not data.startswith(HANDSHAKE):
        child.kill()
        child.wait()
        raise RunError(f"{name}: the ufsgmem interposer did not load into it (no handshake "
                       f"{'before it closed the pipe' if data == b'' else repr(data)} within {timeout:g} s), so it was "
                       "stopped rather than run natively")
