"""A package install is the whole tool: a wheel of the repository, installed into a fresh virtual environment
of the system's Python, runs ``ufsgmem demo`` with the built-in backends and exporters.

The interpreter is the system's Python, ``/usr/bin/python3`` (the one the distribution installs, what a
user without pyenv or conda gets), when it is 3.11 or newer and can make a virtual environment: Debian
ships ``venv`` with the interpreter but ``ensurepip``, without which ``python3 -m venv`` fails, in the
separate package python3-venv, so both modules are probed. This test installs nothing into the system to
make that work. Where the system's Python cannot, the base interpreter of the Python running the tests
is used instead, and the failure messages say which one ran and why. On the machine this was written on
the two differ (Debian's 3.11.2 in /usr/bin, the tests under a pyenv 3.11.7), so the install really
happens in another interpreter than the one that developed it.

The wheel is built by that environment's own pip from a copy of the source without build artefacts (no
compiled ``_lowlevel*.so``, no ``*.egg-info``), so the wheel compiles the cffi module itself and the
repository is left as it was. Dependencies come from the package index pip is configured with. Every
command runs outside the repository (``python -m`` puts the working directory first on ``sys.path``, which
would import the checkout instead of the install) and is bounded; the demo unmounts by itself, and if it
has to be stopped it gets Ctrl-C first (its clean-up path) and any mount it reported is taken down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from clientfix import communicate_or_stop, require_fuse, ufsgmem
from ufsgmem.fuse import server

pytestmark = [pytest.mark.slow, pytest.mark.fuse, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
BACKENDS = ("anon", "hugetlb", "sim", "thp")
EXPORTERS = ("arm64-tables", "json", "png", "text")
# what a clone has that a source tree for a build must not: environments, build output, compiled modules
ARTEFACTS = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                   ".pytest_cache", ".hypothesis", "out")


def venv_python() -> tuple[str, str]:
    """The interpreter to make the environment with, and why that one."""
    probe = "import sys, venv, ensurepip; print(sys.version_info >= (3, 11))"
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60)
        why_not = done.stderr.strip().splitlines()[-1:] or ["older than 3.11"]
        if done.returncode == 0 and done.stdout.strip() == "True":
            return SYSTEM_PYTHON, f"the system's Python, {SYSTEM_PYTHON}"
        why_not = why_not[0]
    except OSError as exc:
        why_not = str(exc)
    base = getattr(sys, "_base_executable", sys.executable)
    return base, f"{base}, the tests' base interpreter ({SYSTEM_PYTHON} cannot make a venv: {why_not})"


def run(command: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def clean_env(venv: Path) -> dict:
    """This environment's variables minus whatever would point Python at the checkout or the tests' venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_demo(ufsgmem_command: Path, out_dir: Path, cwd: Path, env: dict) -> tuple[int, str]:
    """``ufsgmem demo`` bounded: on timeout Ctrl-C (the demo cleans up), then SIGKILL, then unmount what it
    said it mounted; the returned output says it timed out."""
    proc = subprocess.Popen([str(ufsgmem_command), "demo", "--out", str(out_dir)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out, _, stopped = communicate_or_stop(proc, 300, stop=signal.SIGINT, grace=60)
    if not stopped:
        return proc.returncode, out
    mountpoint = re.search(r"^demo: mounted ufsgmem on (\S+)$", out, re.M)
    if mountpoint and server.mount_type(mountpoint[1]) is not None:
        ufsgmem("umount", mountpoint[1])
    return -1, out + "\n[test: the demo did not finish within 300 s and was interrupted]"


def test_wheel_in_a_fresh_venv_of_the_system_python_runs_the_demo(tmp_path):
    require_fuse()
    python, which = venv_python()
    source, wheels, venv, out_dir = (tmp_path / n for n in ("src", "wheels", "venv", "out"))
    shutil.copytree(ROOT, source, ignore=ARTEFACTS)
    env = clean_env(venv)

    made = run([python, "-m", "venv", str(venv)], tmp_path, env, 300)
    assert made.returncode == 0, f"{which}: python -m venv failed:\n{made.stderr}"
    vpython = str(venv / "bin" / "python")
    built = run([vpython, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(source)], tmp_path, env,
                900)
    assert built.returncode == 0, f"{which}: pip wheel failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
    (wheel,) = wheels.glob("ufsgmem-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert any(re.fullmatch(r"ufsgmem/fuse/_lowlevel\..*so", n) for n in names), "the cffi module is compiled in"
    assert any(re.fullmatch(r"ufsgmem/core/_core\..*so", n) for n in names), "the compiled core is in"
    assert "ufsgmem/bench/fuse_floor.c" in names, "package data: the floor server's source"
    assert "ufsgmem/builtin/backends/anon.py" in names and "ufsgmem/builtin/exporters/png.py" in names
    assert "[ufsgmem.backends]" in entry_points and "[ufsgmem.exporters]" in entry_points

    installed = run([vpython, "-m", "pip", "install", str(wheel)], tmp_path, env, 900)
    assert installed.returncode == 0, f"{which}: pip install failed:\n{installed.stderr[-3000:]}"

    # every built-in is declared by the ufsgmem distribution itself and loads from the installed package
    listing = textwrap.dedent("""
        import ufsgmem
        from importlib.metadata import entry_points
        from ufsgmem import plugins
        print(ufsgmem.__file__)
        for group in (plugins.BACKENDS, plugins.EXPORTERS):
            for name in plugins.available(group):
                (ep,) = [ep for ep in entry_points(group=group) if ep.name == name]
                plugins.load(group, name)
                print(group, name, ep.dist.metadata["Name"], ep.value)
    """)
    listed = run([vpython, "-c", listing], tmp_path, env, 120)
    assert listed.returncode == 0, f"{which}: {listed.stderr}"
    location, *rows = listed.stdout.splitlines()
    assert location.startswith(str(venv)), f"ufsgmem imported from {location}, not from the installed wheel"
    declared = {(group, name): dist for group, name, dist, _ in (row.split() for row in rows)}
    assert declared == {**{("ufsgmem.backends", n): "ufsgmem" for n in BACKENDS},
                        **{("ufsgmem.exporters", n): "ufsgmem" for n in EXPORTERS}}, listed.stdout

    code, out = run_demo(venv / "bin" / "ufsgmem", out_dir, tmp_path, env)
    assert code == 0, f"{which}: ufsgmem demo exited {code}:\n{out}"
    assert "=== ufsgmem demo summary ===" in out and "content checks 8/8 passed" in out, out
    assert re.search(r"^demo: backend (hugetlb|anon)", out, re.M), out
    assert "layout export skipped" not in out, "the exporters come with the package:\n" + out
    assert (out_dir / "layout-kvm.png").stat().st_size > 0 and "text layout (kvm view" in out
    mountpoint = re.search(r"^demo: mounted ufsgmem on (\S+)$", out, re.M)
    assert mountpoint and server.mount_type(mountpoint[1]) is None, "the demo unmounted"
