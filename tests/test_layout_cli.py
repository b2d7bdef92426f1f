"""``ufsgmem layout``: on a saved snapshot and on a file of a real ufsgmem mount."""

from __future__ import annotations

import json
import os

import pytest

from clientfix import mounted, ufsgmem
from layout_model import PAGE
from ufsgmem.gmem import GuestMemfd

M = 1 << 20


@pytest.fixture
def saved(tmp_path):
    with GuestMemfd(8 * M, 3, backend="anon", name="vm0") as g:
        g.guest_write(0, b"\1" * (8 * M))
        g.set_memory_attributes(M, 2 * PAGE, 8)
        path = tmp_path / "vm0.json"
        path.write_text(g.snapshot().to_json())
    return path


def test_text_to_stdout_by_default(saved):
    done = ufsgmem("layout", saved)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("view guest   arch x86_64") and "vm0" in done.stdout


def test_json_with_view_arch_and_memslot(saved, tmp_path):
    out = tmp_path / "kvm.json"
    done = ufsgmem("layout", saved, "--view", "kvm", "--arch", "arm64-4k", "--exporter", "json", "-o", out,
                   "--memslot", "0x100000000:1M")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    doc = json.loads(out.read_text())
    assert (doc["view"], doc["arch"]) == ("kvm", "arm64-4k")
    assert doc["memslot"] == {"guest_base": 1 << 32, "offset": M, "size": 7 * M}
    first = doc["mappings"][0]
    assert first["guest"] == 1 << 32 and first["attribute"] == "private"
    assert sum(m["size"] for m in doc["mappings"]) == 7 * M


def test_png_needs_an_output_file(saved, tmp_path):
    done = ufsgmem("layout", saved, "--exporter", "png")
    assert done.returncode == 2 and "-o FILE" in done.stderr
    done = ufsgmem("layout", saved, "--exporter", "png", "-o", tmp_path / "x.png")
    assert done.returncode == 0 and (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,message", [
    (["--exporter", "nope"], "unknown exporter 'nope'; available: arm64-tables, json, png, text"),
    (["--memslot", "zz"], "--memslot 'zz'"),
    (["--memslot", "0:9G"], "outside the"),
])
def test_bad_arguments(saved, args, message):
    done = ufsgmem("layout", saved, *args)
    assert done.returncode == 1 and message in done.stderr


def test_not_a_snapshot(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    done = ufsgmem("layout", bad)
    assert done.returncode == 1 and "not a ufsgmem snapshot" in done.stderr
    done = ufsgmem("layout", tmp_path / "missing.json")
    assert done.returncode == 1 and "does not exist" in done.stderr


@pytest.mark.fuse
def test_on_a_mounted_file(tmp_path):
    with mounted(str(tmp_path / "mnt")) as mnt:
        done = ufsgmem("create", mnt, "vm0", "--size", "4M", "--flags", "mmap,init_shared")
        assert done.returncode == 0, done.stderr
        fd = os.open(os.path.join(mnt, "vm0", "guest"), os.O_RDWR)
        try:
            assert os.pwrite(fd, b"\1" * (4 * M), 0) == 4 * M  # allocate every page (a vCPU writing)
        finally:
            os.close(fd)
        done = ufsgmem("convert", os.path.join(mnt, "vm0"), "--offset", "1M", "--size", "4K", "--to", "private")
        assert done.returncode == 0, done.stderr
        done = ufsgmem("layout", os.path.join(mnt, "vm0"), "--view", "shared", "--exporter", "json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["view"] == "shared" and doc["size"] == 4 * M and doc["name"] == "vm0"
        assert doc["mapped_bytes"] == 4 * M - PAGE, "every shared page, and only those"
        assert all(not (m["guest"] <= M < m["guest"] + m["size"]) for m in doc["mappings"]), \
            "the private page is not in the shared view"
