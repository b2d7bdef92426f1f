"""Build the interposer (``shim.c``) with the machine's C compiler, once per source version.

Why compile at run time rather than at install (cffi, a wheel): the library must match the libc the
*program* runs with, and a per-source-hash cache makes the cost one compile (~0.3 s) per machine and
version. The result goes to ``$XDG_CACHE_HOME/ufsgmem`` (``~/.cache/ufsgmem``) as ``shim-<hash>.so``,
written to a temporary name and renamed, so concurrent runs never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile

SOURCE = os.path.join(os.path.dirname(__file__), "shim.c")


class ShimUnavailable(Exception):
    """The interposer cannot be built here (the message says why)."""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ufsgmem")


def build_shim() -> str:
    """The path of the compiled interposer, building it if this source version has not been built."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source).hexdigest()[:16]
    directory = cache_dir()
    path = os.path.join(directory, f"shim-{digest}.so")
    if os.path.exists(path):
        return path
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ShimUnavailable("no C compiler (cc/gcc) to build the ufsgmem run interposer")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shim-", suffix=".so", dir=directory)
    os.close(fd)
    try:
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, SOURCE, "-lpthread"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ShimUnavailable(f"building {SOURCE} failed: {proc.stderr.strip()[:600]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
