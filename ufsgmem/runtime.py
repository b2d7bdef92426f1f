"""Where a user's ufsgmem keeps its runtime files (a server's pidfile and log), whoever the user is.

Root keeps them in ``/run/ufsgmem`` (a tmpfs: nothing outlives a reboot, so a pidfile is never older than
the boot). An ordinary user cannot write there, so the first of these that applies is theirs:

* ``$XDG_RUNTIME_DIR/ufsgmem``: the per-user runtime directory a login session gets (``/run/user/UID``),
  a tmpfs of the user's own, mode 0700, which is what runtime files are for;
* ``$XDG_CACHE_HOME/ufsgmem``, else ``~/.cache/ufsgmem``: where there is no login session (a cron job, a
  container, ``setpriv``); it outlives a reboot, which is harmless because ``ufsgmem umount`` trusts a
  pidfile only when the recorded pid *and* start time name a live process.

The directory is made mode 0700 and must belong to the user (the log names files and requests, and a
pidfile someone else can write would point ``ufsgmem umount`` at another process): one that belongs to
someone else is refused with the reason rather than used. ``$XDG_RUNTIME_DIR`` is ignored where it does
not name a directory of the user's, as the XDG specification asks.
"""

from __future__ import annotations

import errno
import os
import stat

ROOT_DIR = "/run/ufsgmem"


def _own_directory(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def run_dir() -> str:
    """The directory for this user's pidfiles and logs (it may not exist yet: :func:`ensure_run_dir`)."""
    if os.geteuid() == 0:
        return ROOT_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and _own_directory(runtime):
        return os.path.join(runtime, "ufsgmem")
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ufsgmem")


def ensure_run_dir() -> str:
    """Create :func:`run_dir` (mode 0700) if needed and check it is the user's own; its path. An
    OSError says what is wrong and what to do."""
    path = run_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create ufsgmem's runtime directory {path}: {exc.strerror} "
                                 "(set XDG_RUNTIME_DIR to a directory of yours)") from None
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"ufsgmem's runtime directory {path} belongs to uid {st.st_uid}, not to you "
                                   f"(uid {os.geteuid()}): remove it or set XDG_RUNTIME_DIR to a directory of yours")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)  # the log names files and requests: the owner's only
    return path
