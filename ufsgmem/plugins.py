"""Plugin discovery and validation for backends and exporters.

Each backend or exporter is picked *by name*, so plain ``importlib.metadata`` entry points are enough
(groups ``ufsgmem.backends`` and ``ufsgmem.exporters``); pluggy would only add 1:N dispatch we don't need.
What we do borrow from pluggy is validation at load time: a plugin that lacks a required method or
attribute is refused with a message naming what is missing, never discovered later as an AttributeError
in the middle of a conversion. An unknown name is an error that lists the names that exist, and a name
that two installed distributions both declare is an error naming both: picking one would depend on the
order of ``sys.path`` (a leftover of the old ``ufsgmem-plugins`` distribution, which declared the names
ufsgmem's own metadata now declares, would otherwise shadow them with modules that no longer exist).

``register()`` adds a plugin without installed metadata (tests inject fakes this way). The interfaces
(``backend.py``, ``exporter.py``) sit below this module: they say what a plugin must have, and know
nothing of how plugins are found.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from . import backend, exporter
from .errors import PluginError

BACKENDS = "ufsgmem.backends"
EXPORTERS = "ufsgmem.exporters"

_REQUIREMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
_registered: dict[str, dict[str, object]] = {BACKENDS: {}, EXPORTERS: {}}
_loaded: dict[tuple[str, str], object] = {}


def _requirements(group: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if group == BACKENDS:
        return backend.REQUIRED_ATTRIBUTES, backend.REQUIRED_METHODS
    if group == EXPORTERS:
        return exporter.REQUIRED_ATTRIBUTES, exporter.REQUIRED_METHODS
    raise PluginError(f"unknown plugin group {group!r}")


def available(group: str) -> list[str]:
    """Sorted names of every plugin in ``group`` (installed entry points and registered ones)."""
    names = {ep.name for ep in entry_points(group=group)} | set(_registered[group])
    return sorted(names)


def validate(group: str, name: str, plugin: object) -> object:
    """Check that ``plugin`` has every required attribute and callable; return it."""
    attributes, methods = _requirements(group)
    missing = [a for a in attributes if not hasattr(plugin, a)]
    missing += [m for m in methods if not callable(getattr(plugin, m, None))]
    abstract = sorted(getattr(plugin, "__abstractmethods__", ()))
    if missing or abstract:
        what = ", ".join(missing + [f"{m} (abstract)" for m in abstract if m not in missing])
        raise PluginError(f"{group} plugin {name!r} ({plugin!r}) does not implement: {what}")
    declared = getattr(plugin, "name", name)
    if declared != name:
        raise PluginError(f"{group} plugin registered as {name!r} calls itself {declared!r}")
    return plugin


def register(group: str, name: str, plugin: object) -> None:
    """Add (and validate) a plugin under ``name`` without installed metadata."""
    _registered[group][name] = validate(group, name, plugin)
    _loaded.pop((group, name), None)


def unregister(group: str, name: str) -> None:
    _registered[group].pop(name, None)
    _loaded.pop((group, name), None)


def load(group: str, name: str) -> object:
    """The validated plugin called ``name``; PluginError listing the available names if none is."""
    key = (group, name)
    if key in _loaded:
        return _loaded[key]
    if name in _registered[group]:
        plugin = _registered[group][name]
    else:
        matches = [ep for ep in entry_points(group=group) if ep.name == name]
        if not matches:
            names = ", ".join(available(group)) or "none installed"
            kind = group.rsplit(".", 1)[-1][:-1]
            raise PluginError(f"unknown {kind} {name!r}; available: {names}")
        if len({ep.value for ep in matches}) > 1:
            owners = ", ".join(sorted(f"{_distribution(ep)} ({ep.value})" for ep in matches))
            raise PluginError(f"{group} plugin {name!r} is declared by more than one installed distribution: "
                              f"{owners}; uninstall all but one")
        try:
            plugin = matches[0].load()
        except Exception as exc:  # a broken plugin must not look like an unknown one
            raise PluginError(f"{group} plugin {name!r} failed to load: {exc}") from exc
        validate(group, name, plugin)
    _loaded[key] = plugin
    return plugin


def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else "?"


def load_backend(name: str):
    return load(BACKENDS, name)


def load_exporter(name: str):
    return load(EXPORTERS, name)


def export(name: str, snapshot, *, view: str = "guest", arch: str = "x86_64") -> bytes:
    """Run the exporter plugin called ``name`` on ``snapshot`` (PluginError listing the names if there is
    none; EINVAL naming the choices for an unknown view or arch)."""
    plugin = load_exporter(name)
    instance = plugin() if isinstance(plugin, type) else plugin
    return instance.export(snapshot, view=view, arch=arch)
