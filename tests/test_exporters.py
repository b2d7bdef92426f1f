"""The json, text and png exporters: registered as plugins, schema, agreement with the layout, readability."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from layout_model import PAGE, Model, Pages, tib_snapshot
from ufsgmem.errors import GuestMemfdError, PluginError
from ufsgmem.plugins import export
from ufsgmem.layout import VIEWS, compute_layout
from ufsgmem.plugins import EXPORTERS, available

M = 1 << 20


def pages_with_holes() -> Pages:
    n = 2048  # 8 MiB, 2M folios, holes at 1M+4K and 5M..5M+64K, a non-contiguous jump at 6M
    private = np.ones(n, dtype=bool)
    private[257] = False
    private[1280:1296] = False
    phys = (1 << 33) + np.arange(n, dtype=np.int64) * PAGE
    phys[1536:] += 2 * M
    split = np.zeros(n, dtype=bool)
    split[0:512] = split[1024:1536] = True
    return Pages(private, phys, 2 * M, split)


def test_exporters_are_entry_point_plugins():
    assert {"json", "text", "png", "arm64-tables"} <= set(available(EXPORTERS))
    with pytest.raises(PluginError, match="available: .*json"):
        export("nope", pages_with_holes().snapshot())


@pytest.mark.parametrize("view", VIEWS)
def test_json_schema_and_every_page(view):
    pages = pages_with_holes()
    doc = json.loads(export("json", pages.snapshot(), view=view, arch="x86_64"))
    assert doc["format"] == "ufsgmem-layout/1" and doc["view"] == view and doc["arch"] == "x86_64"
    model = Model(pages, view, __import__("ufsgmem.layout", fromlist=["ARCHES"]).ARCHES["x86_64"])
    seen = set()
    prev_end = 0
    for m in doc["mappings"]:
        assert all(isinstance(m[k], int) for k in ("guest", "phys", "size", "block", "count", "level"))
        assert m["attribute"] in ("private", "shared", "mixed") and m["perms"] in ("rwx", "rw-")
        assert m["size"] == m["block"] * m["count"] and m["guest"] >= prev_end, "address order, no overlap"
        prev_end = m["guest"] + m["size"]
        for off in range(0, m["size"], PAGE):
            seen.add(m["guest"] + off)
            assert pages.phys[(m["guest"] + off) // PAGE] == m["phys"] + off
    assert seen == model.mappable()
    assert sum(doc["counts_by_size"].values()) == doc["leaves"] == model.minimum()


def test_json_view_specific_content():
    snap = pages_with_holes().snapshot()
    shared = json.loads(export("json", snap, view="shared"))["mappings"]
    assert [(m["guest"], m["size"], m["attribute"]) for m in shared] == \
        [(M + PAGE, PAGE, "shared"), (5 * M, 64 << 10, "shared")]
    kvm = json.loads(export("json", snap, view="kvm"))
    assert kvm["counts_by_size"] == {"4096": 1024, "2097152": 2}, "the 2M blocks with holes go to 4K"
    guest = json.loads(export("json", snap, view="guest"))
    assert guest["counts_by_size"] == {"2097152": 4} and \
        [m["attribute"] for m in guest["mappings"]][:2] == ["mixed", "private"]


def test_text_has_summary_and_rows():
    out = export("text", pages_with_holes().snapshot(), view="kvm", arch="arm64-4k").decode()
    assert "view kvm" in out and "arm64-4k" in out and "leaves by attribute" in out
    layout = compute_layout(pages_with_holes().snapshot(), "kvm", "arm64-4k")
    rows = [l for l in out.splitlines() if l.startswith("0x")]
    assert len(rows) == len(layout)
    assert f"in {layout.leaf_count} leaves" in out


def test_png_is_a_picture_with_marks_where_the_holes_are():
    from ufsgmem.builtin.exporters.png import strips
    import matplotlib.image
    snap = pages_with_holes().snapshot()
    data = export("png", snap, view="kvm", arch="x86_64")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(io.BytesIO(data))
    assert image.shape[0] > 400 and image.shape[1] > 1000
    s = strips(compute_layout(snap, "kvm", "x86_64"), snap)
    bins = len(s["shared"])
    assert s["shared"].sum() * 8 * M / bins == pytest.approx(17 * PAGE)
    assert s["allocated"].min() == pytest.approx(1.0)
    assert s["by_size"].sum(axis=0).min() == pytest.approx(1.0), "kvm maps every byte here"
    assert s["split"].sum() == 2


def test_png_at_1tib_with_100k_holes_aggregates():
    from ufsgmem.builtin.exporters.png import strips
    snap = tib_snapshot()
    layout = compute_layout(snap, "kvm", "x86_64")
    s = strips(layout, snap)
    assert s["shared"].sum() * (1 << 40) / len(s["shared"]) == pytest.approx(100_000 * PAGE)
    assert (s["split"] > 0).all() and s["leaf"].shape[1] == len(s["shared"])


def test_bad_view_and_arch_are_einval():
    snap = pages_with_holes().snapshot()
    with pytest.raises(GuestMemfdError, match="unknown view 'host'.*guest, shared, kvm"):
        export("json", snap, view="host")
    with pytest.raises(GuestMemfdError, match="unknown arch 'riscv'.*x86_64"):
        export("text", snap, arch="riscv")


def test_the_documented_example_plugin(tmp_path):
    """docs/plugins-exporters.md's minimal plugin, registered without installing, works end to end."""
    import pathlib
    import re
    from ufsgmem.plugins import register, unregister
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "plugins-exporters.md").read_text()
    code = re.search(r"```python\n(# my_exporters/csv_exporter.py\n.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "csv_exporter.py", "exec"), namespace)
    register(EXPORTERS, "csv", namespace["EXPORTER"])
    try:
        out = export("csv", pages_with_holes().snapshot(), view="shared").decode().splitlines()
    finally:
        unregister(EXPORTERS, "csv")
    assert out == ["guest,phys,block,count,level,attribute", f"{M + PAGE:#x},{(1 << 33) + M + PAGE:#x},4096,1,1,shared",
                   f"{5 * M:#x},{(1 << 33) + 5 * M:#x},4096,16,1,shared"]
