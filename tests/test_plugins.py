"""Plugin discovery and validation: entry points, unknown names, incomplete classes, register/unregister,
and a third-party plugin installed the way a user would install it (examples/minimal_backend)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from ufsgmem import plugins
from ufsgmem.backend import REQUIRED_METHODS, Backend, PhysExtent
from ufsgmem.errors import PluginError
from ufsgmem.gmem import GuestMemfd

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = ("anon", "hugetlb", "sim", "thp")


class FakeBackend(Backend):
    """Just enough of a backend for the registry: a bytearray, extents at the file offset."""

    name = "fake"
    page_sizes = (4096,)

    def __init__(self, size, page_size, *, progress=None, **options):
        super().__init__(size, page_size, progress=progress, **options)
        self.data = bytearray(size)
        self.allocated = 0

    def view(self, offset, size):
        return memoryview(self.data)[offset:offset + size]

    def write(self, offset, data):
        data = memoryview(data).cast("B")
        self.data[offset:offset + len(data)] = data

    def allocate(self, offset, size):
        self.allocated += size

    def punch_hole(self, offset, size):
        self.data[offset:offset + size] = bytes(min(size, self.size - offset))

    def physical_extents(self):
        return [PhysExtent(0, 0, self.size)]

    def backend_bytes(self):
        return self.allocated

    def close(self):
        pass


@pytest.fixture
def fake():
    plugins.register(plugins.BACKENDS, "fake", FakeBackend)
    yield FakeBackend
    plugins.unregister(plugins.BACKENDS, "fake")


def test_entry_point_group_lists_the_built_in_backends():
    names = {ep.name for ep in entry_points(group="ufsgmem.backends")}
    assert set(BUILT_IN) <= names, "the built-in backends are registered as entry points"
    assert set(BUILT_IN) <= set(plugins.available(plugins.BACKENDS))


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_backend_loads_and_validates(name):
    cls = plugins.load_backend(name)
    assert issubclass(cls, Backend)
    assert cls.name == name, "a backend calls itself by its entry-point name"
    assert cls.page_sizes and all(p % 4096 == 0 for p in cls.page_sizes)


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(PluginError, match=r"^unknown backend 'nosuch'; available: ") as info:
        plugins.load_backend("nosuch")
    for name in BUILT_IN:
        assert name in str(info.value), f"the error lists {name}"


def test_unknown_backend_through_the_core_is_a_plugin_error():
    with pytest.raises(PluginError, match="available: "):
        GuestMemfd(1 << 20, 0, backend="nosuch")


def test_class_missing_methods_is_refused_naming_them():
    class Partial:
        name = "partial"
        page_sizes = (4096,)

        def view(self, offset, size):
            return memoryview(b"")

    with pytest.raises(PluginError) as info:
        plugins.register(plugins.BACKENDS, "partial", Partial)
    message = str(info.value)
    for method in ("write", "allocate", "punch_hole", "physical_extents", "backend_bytes", "close"):
        assert method in message, f"the error names the missing method {method}"
    assert "view" not in message.split("implement:", 1)[1], "a method that exists is not reported missing"
    assert "partial" not in plugins.available(plugins.BACKENDS), "a refused plugin is not registered"


def test_abstract_subclass_is_refused_naming_the_abstract_methods():
    class HalfDone(Backend):
        name = "halfdone"
        page_sizes = (4096,)

        def view(self, offset, size):
            return memoryview(b"")

    with pytest.raises(PluginError, match=r"punch_hole \(abstract\)"):
        plugins.register(plugins.BACKENDS, "halfdone", HalfDone)


def test_missing_attribute_is_refused():
    methods = {m: (lambda self, *args: None) for m in REQUIRED_METHODS}
    no_page_sizes = type("NoPageSizes", (), {"name": "nopages", **methods})
    with pytest.raises(PluginError, match=r"does not implement: page_sizes$"):
        plugins.register(plugins.BACKENDS, "nopages", no_page_sizes)


def test_name_must_match_the_registration():
    with pytest.raises(PluginError, match=r"registered as 'other' calls itself 'fake'"):
        plugins.register(plugins.BACKENDS, "other", FakeBackend)


def test_register_and_unregister_a_fake_backend(fake):
    assert "fake" in plugins.available(plugins.BACKENDS)
    assert plugins.load_backend("fake") is fake
    with GuestMemfd(1 << 20, 3, backend="fake") as gmem:
        gmem.host_write(8192, b"fake memory")
        assert bytes(gmem.host_read(8192, 11)) == b"fake memory"
        assert gmem.status()["backend"] == "fake"
    plugins.unregister(plugins.BACKENDS, "fake")
    assert "fake" not in plugins.available(plugins.BACKENDS)
    with pytest.raises(PluginError, match="unknown backend 'fake'"):
        plugins.load_backend("fake")


def test_broken_entry_point_is_not_reported_as_unknown(tmp_path):
    """An installed plugin whose import fails says so (not 'unknown backend')."""
    (out,) = _load_beside(tmp_path, "broken-plugin", "broken = no_such_module_here:Backend", "broken")
    assert "'broken' failed to load" in out and "no_such_module_here" in out


def test_a_name_two_distributions_declare_is_refused_naming_both(tmp_path):
    """A second distribution declaring a built-in's name (say a leftover of the old ufsgmem-plugins) makes
    the name ambiguous: loading it fails naming both, instead of whichever sys.path lists first."""
    out = _load_beside(tmp_path, "shadow-plugin", "anon = no_such_module_here:AnonBackend", "anon", "sim")
    assert "'anon' is declared by more than one installed distribution" in out[0], out
    assert "shadow-plugin (no_such_module_here:AnonBackend)" in out[0]
    assert "ufsgmem (ufsgmem.builtin.backends.anon:AnonBackend)" in out[0]
    assert out[1] == "sim", "names only one distribution declares still load"


def _load_beside(tmp_path: Path, distribution: str, entry_point: str, *names: str) -> list[str]:
    """Install (by hand: a dist-info folder) a distribution declaring one backend entry point, then load
    each of ``names`` in a fresh interpreter; one line per name, its ``name`` or the PluginError."""
    dist = tmp_path / f"{distribution.replace('-', '_')}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[ufsgmem.backends]\n{entry_point}\n")
    code = textwrap.dedent("""
        import sys
        from ufsgmem import plugins
        from ufsgmem.errors import PluginError
        for name in sys.argv[1:]:
            try:
                print(plugins.load_backend(name).name)
            except PluginError as exc:
                print(exc)
    """)
    return subprocess.run([sys.executable, "-c", code, *names], env=_env(tmp_path), capture_output=True,
                          text=True, check=True).stdout.splitlines()


def _env(path: Path) -> dict:
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
def test_third_party_plugin_installs_and_works(tmp_path):
    """pip-install examples/minimal_backend into a scratch directory (never into .venv) and use it."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "minimal_backend", source)  # builds leave files; not in the repo
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--target", str(target), str(source)], check=True, capture_output=True)
    code = textwrap.dedent("""
        from importlib.metadata import entry_points
        from ufsgmem.gmem import GuestMemfd
        print(sorted(e.name for e in entry_points(group="ufsgmem.backends")))
        with GuestMemfd(1 << 20, 3, backend="bytes") as gmem:
            gmem.host_write(4096, b"third party")
            gmem.set_memory_attributes(0, 1 << 20, 8)
            gmem.set_memory_attributes(0, 1 << 20, 0)
            print(bytes(gmem.host_read(4096, 11)).decode(), gmem.status()["backend_bytes"])
            gmem.punch_hole(4096, 4096)
            print(bytes(gmem.host_read(4096, 11)) == bytes(11))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(target), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "'bytes'" in out[0] and all(f"'{n}'" in out[0] for n in BUILT_IN)
    assert out[1] == "third party 4096", "content survives a round trip of conversions"
    assert out[2] == "True", "punch_hole zeroes"
    import importlib.util
    assert importlib.util.find_spec("ufsgmem_bytes_backend") is None, "the example is not installed in .venv"
