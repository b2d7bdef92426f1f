"""``ufsgmem bench --quick`` runs to the end and writes every target with its reference (CI smoke run).

Nothing here asserts a time: figures belong to the benchmark, not to the tests. What is asserted is the
shape of the JSON a reader relies on, and that the run leaves no mount and no huge pages behind.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile

from ufsgmem import hugepages

SZ_2M = 2 << 20


def fuse_mounts(under) -> set[tuple[str, str]]:
    """Every FUSE mount the bench makes (ufsgmem's and the floor server's alike, whose type is plain
    ``fuse``), as (mount point, type). The bench makes its mount points in the temporary directory, which
    the tests point at ``under`` (a directory of their own): a bench or test run beside them on the same
    machine does not count."""
    with open("/proc/self/mounts") as f:
        return {(fields[1], fields[2]) for fields in (line.split() for line in f)
                if (fields[2] == "fuse" or fields[2].startswith("fuse."))
                and os.path.dirname(fields[1]) == str(under)
                and os.path.basename(fields[1]).startswith(("ufsgmem-bench-", "ufsgmem-floor-"))}


def test_quick_bench_writes_every_target(tmp_path):
    out = tmp_path / "bench.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    pool = hugepages.read(SZ_2M)
    proc = subprocess.run([sys.executable, "-m", "ufsgmem", "bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, TMPDIR=str(scratch)))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    unavailable = result["unavailable"]
    for target in ("P1", "P2", "P3", "P4", "P5", "P6", "STREAM"):
        figure = result[target]
        assert set(figure) >= {"value", "reference", "ratio", "unit", "raw"}, target
        if target == "P6" and "P6 (hugetlb backend)" in unavailable:
            assert "not measured" in figure["note"]
            continue
        assert isinstance(figure["value"], float | int) and math.isfinite(figure["value"]), target
        assert figure["raw"]["value"]["repetitions"], f"{target} has no raw repetitions"
    # P1 always has a reference (shmem memfd where the kernel has no guest_memfd); P2/P3 have the floor
    # server wherever it can be built, and otherwise say why not
    assert result["P1"]["reference"] is not None
    assert result["P1"]["reference_name"] == ("shmem memfd" if "kernel guest_memfd" in unavailable
                                              else "kernel guest_memfd")
    for target in ("P2", "P3"):
        if "the FUSE floor server" in unavailable:
            assert result[target]["reference"] is None and "no FUSE floor" in result[target]["note"]
        else:
            assert result[target]["reference_name"].endswith("floor server"), target
    assert result["P4"]["reference"] is not None
    assert result["P6"]["reference"] is not None or "P6 (hugetlb backend)" in unavailable
    assert {"P3.clean", "P3.onecpu", "P3.onecpu.clean", "P3.kernel", "P2.kernel"} <= set(result["context"])
    # STREAM: the compiled hot path against a --hot-path python mount, or the reason there is none
    stream = result["STREAM"]
    assert math.isfinite(stream["value"]) and stream["value"] > 0
    if "STREAM on a --hot-path python mount" in unavailable:
        assert stream["reference"] is None and stream["met"] is None and "no python hot path" in stream["note"]
        assert "STREAM.python" not in result["context"]
    else:
        assert "python" in stream["reference_name"] and stream["ratio"] is not None and stream["met"] is not None
        assert result["context"]["STREAM.python"]["value"] == stream["reference"]
    assert result["machine"]["kernel"] and result["machine"]["libfuse"]
    assert "P1" in proc.stdout and "ratio" in proc.stdout
    for what, reason in unavailable.items():  # each missing reference is named, with its reason, to people too
        assert reason and f"{what}: {reason}" in proc.stdout
    assert not fuse_mounts(scratch), "bench left a mount behind"
    assert hugepages.read(SZ_2M) == pool, "bench left huge pages reserved"


def test_bench_without_the_kernel_reference_says_why(tmp_path, monkeypatch):
    """Where the kernel has no guest_memfd (this machine, and any without /dev/kvm), nothing is compared
    with it and the reason is recorded; P1 falls back to shmem memfd."""
    from ufsgmem import kvm
    from ufsgmem.bench import suite

    monkeypatch.setattr(kvm, "skip_reason", lambda: "/dev/kvm is absent (no KVM on this machine)")
    refs = suite.References.probe()
    assert refs.kernel_gmem == "/dev/kvm is absent (no KVM on this machine)"
    assert refs.unavailable == {"kernel guest_memfd": refs.kernel_gmem}


def test_stream_without_the_python_hot_path_says_why(monkeypatch, tmp_path):
    """A server that refuses STREAM's reference mount (one from before ``--hot-path``, or an option it does
    not know) leaves STREAM measured on the default mount, its reference unavailable with the mount's own
    reason, and no ``STREAM.python``; the run goes on and leaves no mount behind."""
    from ufsgmem.bench import suite

    monkeypatch.setattr(suite, "HOT_PATH_PYTHON", ("--hot-path", "no-such-path"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the bench makes its mount points
    cfg = suite.Config(size=8 << 20, reps=2, stream=16)
    refs = suite.References(kernel_gmem=None)
    with suite.mounted() as mount:
        figures = suite.conversion_stream(cfg, mount, refs, suite.Progress(1))
    assert not fuse_mounts(tmp_path) and not os.listdir(tmp_path), "a mount or its directory was left behind"
    reason = refs.unavailable["STREAM on a --hot-path python mount"]
    assert "--hot-path no-such-path" in reason and "exit 2" in reason, reason
    assert [fig.id for fig in figures] == ["STREAM"]
    (stream,) = figures
    assert stream.reference is None and stream.met is None and stream.ratio is None
    assert reason in stream.note
    assert len(stream.value.values) == 2 and all(v > 0 for v in stream.value.values)
