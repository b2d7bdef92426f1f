"""The create/destroy/convert/status commands end to end on a real mount; --help of every command; bad
sizes give clear errors without touching anything."""

from __future__ import annotations

import json
import os

import pytest

from clientfix import mounted, ufsgmem
from ufsgmem.cli import _command_names

SZ_2M = 2 << 20

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def mnt(tmp_path_factory):
    with mounted(str(tmp_path_factory.mktemp("cli") / "mnt")) as path:
        yield path


@pytest.mark.parametrize("command", [None, *_command_names()])
def test_help_of_every_command(command):
    done = ufsgmem(*([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: ufsgmem" in done.stdout
    if command:
        assert len(done.stdout.splitlines()) > 3, f"ufsgmem {command} --help says too little"


def test_create_convert_status_destroy(mnt):
    done = ufsgmem("create", mnt, "vm0", "--size", "0x400000", "--flags", "mmap,init_shared")
    assert done.returncode == 0, done.stderr
    assert "4M" in done.stdout and "anon" in done.stdout

    done = ufsgmem("convert", f"{mnt}/vm0", "--offset", "1M", "--size", "8K", "--to", "private")
    assert done.returncode == 0, done.stderr
    status = json.loads(ufsgmem("status", f"{mnt}/vm0", "--json", check=True).stdout)
    assert status["private_bytes"] == 8192 and status["size"] == 4 << 20

    human = ufsgmem("status", f"{mnt}/vm0", check=True).stdout
    assert "private 8K" in human and "attribute runs: 3" in human
    assert "[0x100000, 0x102000)" in human and "private" in human

    done = ufsgmem("convert", f"{mnt}/vm0", "--offset", "0x100000", "--size", "8192", "--to", "shared")
    assert done.returncode == 0, done.stderr
    assert json.loads(ufsgmem("status", f"{mnt}/vm0", "--json").stdout)["private_bytes"] == 0

    assert ufsgmem("destroy", mnt, "vm0").returncode == 0
    done = ufsgmem("status", f"{mnt}/vm0")
    assert done.returncode != 0 and "ENOENT" in done.stderr


def test_errors_name_the_errno(mnt):
    assert ufsgmem("create", mnt, "e0", "--size", "64K", "--flags", "mmap").returncode == 0
    try:
        done = ufsgmem("convert", f"{mnt}/e0", "--offset", "1", "--size", "4K", "--to", "private")
        assert done.returncode == 1 and "EINVAL" in done.stderr
        done = ufsgmem("create", mnt, "e0", "--size", "64K")
        assert done.returncode == 1 and "EEXIST" in done.stderr
        done = ufsgmem("create", mnt, "e1", "--size", "4097")
        assert done.returncode == 1 and "EINVAL" in done.stderr
        done = ufsgmem("create", mnt, "e1", "--size", "4K", "--flags", "mmap,bogus")
        assert done.returncode == 1 and "EINVAL" in done.stderr and "bogus" in done.stderr
    finally:
        assert ufsgmem("destroy", mnt, "e0").returncode == 0
    assert ufsgmem("destroy", mnt, "e1").returncode == 1


@pytest.mark.parametrize("argv", [
    ["create", "MNT", "x", "--size", "12Q"],
    ["create", "MNT", "x", "--size=-4K"],
    ["create", "MNT", "x", "--size", "0xZZ"],
    ["convert", "MNT/x", "--offset", "1.5M", "--size", "4K", "--to", "private"],
    ["convert", "MNT/x", "--offset", "0", "--size", "four", "--to", "shared"],
])
def test_bad_sizes_are_clear_usage_errors(mnt, argv):
    done = ufsgmem(*[a.replace("MNT", mnt) for a in argv])
    assert done.returncode == 2, "a malformed size is a usage error"
    assert "not a size" in done.stderr and "K/M/G/T" in done.stderr
    assert "x" not in ufsgmem("status", f"{mnt}/x").stdout


def test_convert_without_to_is_a_usage_error(mnt):
    done = ufsgmem("convert", f"{mnt}/x", "--offset", "0", "--size", "4K")
    assert done.returncode == 2 and "--to" in done.stderr


def test_hugetlb_create_progress_only_when_asked(mnt, hugepages):
    """--progress shows the pool handing out the file's huge pages; without it (stderr not a terminal)
    stderr stays empty."""
    with hugepages(SZ_2M, 8):
        done = ufsgmem("create", mnt, "hp0", "--size", "16M", "--flags", "mmap", "--backend", "hugetlb",
                       "--progress")
        assert done.returncode == 0, done.stderr
        lines = done.stderr.splitlines()
        assert lines[0] == "creating hp0: preallocated 0 of 16M (0%)"
        assert lines[-1] == "creating hp0: preallocated 16M of 16M (100%)"
        percents = [int(line.rsplit("(", 1)[1].rstrip("%)")) for line in lines]
        assert percents == sorted(set(percents)), "one line per tenth, never backwards"
        assert "backend hugetlb" in done.stdout
        assert ufsgmem("destroy", mnt, "hp0").returncode == 0

        done = ufsgmem("create", mnt, "hp1", "--size", "16M", "--flags", "mmap", "--backend", "hugetlb")
        assert done.returncode == 0 and done.stderr == ""
        assert ufsgmem("destroy", mnt, "hp1").returncode == 0


def test_a_name_over_63_bytes_is_einval_before_anything_is_sent(mnt):
    done = ufsgmem("create", mnt, "n" * 64, "--size", "4K")
    assert done.returncode == 1 and "EINVAL" in done.stderr and "63" in done.stderr
    assert "n" * 64 not in os.listdir(mnt)
