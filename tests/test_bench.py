"""``ufsgmem bench --quick`` runs to the end and writes every target with its reference (CI smoke run).

Nothing here asserts a time: figures belong to the benchmark, not to the tests. What is asserted is the
shape of the JSON a reader relies on, and that the run leaves no mount and no huge pages behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from ufsgmem import hugepages

SZ_2M = 2 << 20


def fuse_mounts() -> set[tuple[str, str]]:
    """Every FUSE mount (ufsgmem's and the bench's floor server's alike), as (mount point, type)."""
    with open("/proc/self/mounts") as f:
        return {(fields[1], fields[2]) for fields in (line.split() for line in f)
                if fields[2] == "fuse" or fields[2].startswith("fuse.")}


def test_quick_bench_writes_every_target(tmp_path):
    out = tmp_path / "bench.json"
    mounts, pool = fuse_mounts(), hugepages.read(SZ_2M)
    proc = subprocess.run([sys.executable, "-m", "ufsgmem", "bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for target in ("P1", "P2", "P3", "P4", "P5", "P6"):
        figure = result[target]
        assert set(figure) >= {"value", "reference", "ratio", "unit", "raw"}, target
        assert isinstance(figure["value"], float | int) and math.isfinite(figure["value"]), target
        assert figure["raw"]["value"]["repetitions"], f"{target} has no raw repetitions"
    for target in ("P1", "P2", "P3", "P4", "P6"):
        assert result[target]["reference"] is not None, f"{target} is compared with nothing"
    assert {"P3.clean", "P3.onecpu", "P3.onecpu.clean", "P3.lowlat", "P3.lowlat.clean", "P3.floor",
            "P3.floor.clean", "P2.floor"} <= set(result["context"]), "the P3 variants are reported"
    for floor in ("P3.floor", "P3.floor.clean", "P2.floor"):  # against the C floor server, not against nothing
        assert result["context"][floor]["reference"] is not None, floor
    assert result["machine"]["kernel"] and result["machine"]["libfuse"]
    assert "P1" in proc.stdout and "ratio" in proc.stdout
    assert fuse_mounts() == mounts, "bench left a mount behind"
    assert hugepages.read(SZ_2M) == pool, "bench left huge pages reserved"
