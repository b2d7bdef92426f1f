"""The C run map under the sanitizers, with allocation failures injected (tests/c/runmap_fuzz.c).

``test_runmap.py`` drives the map through the Python binding, where malloc never fails. This builds
``runmap_fuzz.c`` (which includes ``runmap.c`` with malloc/calloc/realloc failing on the n-th call) with
AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer, and runs random set/add sequences on maps
of 4-12 runs a chunk against a one-value-per-page model: every update that fails (-ENOMEM, or -EOVERFLOW
from an add past int64) must leave the map exactly as it was, every other must match the model, pass
runmap_check and answer the ranged queries as the model does; nothing may leak or read out of bounds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "c" / "runmap_fuzz.c"
FLAGS = ["-O1", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the C fuzz test")
    exe = tmp_path_factory.mktemp("runmap") / "runmap_fuzz"
    built = subprocess.run(["gcc", *FLAGS, *SANITIZE, str(SOURCE), "-o", str(exe)], capture_output=True,
                           text=True)
    if built.returncode != 0:
        if "sanitize" not in built.stderr and "asan" not in built.stderr:
            pytest.fail(f"runmap_fuzz.c does not build:\n{built.stderr}")
        pytest.skip(f"the sanitizer runtimes are missing: {built.stderr.strip().splitlines()[-1]}")
    return exe


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_updates_with_failing_allocations(fuzz, seed):
    done = subprocess.run([str(fuzz), str(seed), "300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ok, ops, enomem, overflow = done.stdout.split()
    assert ok == "ok" and int(ops) == 300 * 60
    assert int(enomem) > 100 and int(overflow) > 10, "the failure paths must have been taken"
