"""The exporter interface: pure functions from a frozen :class:`~ufsgmem.snapshot.Snapshot` to bytes.

Exporters are *consumers* (vm-memory's split): they read a snapshot and never change state, so the same
snapshot always gives the same output. They are plugins in entry-point group ``ufsgmem.exporters``.
"""

from __future__ import annotations

import abc
from typing import ClassVar


class Exporter(abc.ABC):
    #: The name users pass as ``--exporter``; must equal the entry-point name.
    name: ClassVar[str]
    #: File name suffix of the output (``.json``, ``.png``, ``.bin``).
    suffix: ClassVar[str]

    @abc.abstractmethod
    def export(self, snapshot, *, view: str = "guest", arch: str = "x86_64") -> bytes:
        """Render ``snapshot`` for ``view`` (guest|shared|kvm) on ``arch``."""


REQUIRED_METHODS = ("export",)
REQUIRED_ATTRIBUTES = ("name", "suffix")


class LayoutExporter(Exporter):
    """An exporter that renders the computed :class:`~ufsgmem.layout.Layout`: subclasses write ``render``.

    ``export`` checks the view and arch (EINVAL naming the choices), computes the layout once and hands
    both the layout and the snapshot (for split folios, pins, attribute runs) to ``render``.
    """

    @abc.abstractmethod
    def render(self, layout, snapshot) -> bytes:
        """Bytes of ``layout`` (computed from ``snapshot``)."""

    def export(self, snapshot, *, view: str = "guest", arch: str = "x86_64") -> bytes:
        from .layout import compute_layout
        check_choice(view, arch)
        return self.render(compute_layout(snapshot, view, arch), snapshot)


def check_choice(view: str, arch: str) -> None:
    """EINVAL naming the valid choices for an unknown view or arch."""
    import errno

    from .errors import fail
    from .layout import ARCHES, VIEWS
    if view not in VIEWS:
        raise fail(errno.EINVAL, f"unknown view {view!r}; available: {', '.join(VIEWS)}")
    if arch not in ARCHES:
        raise fail(errno.EINVAL, f"unknown arch {arch!r}; available: {', '.join(ARCHES)}")


def export(name: str, snapshot, *, view: str = "guest", arch: str = "x86_64") -> bytes:
    """Run the exporter plugin called ``name`` (PluginError listing the names if there is none)."""
    from .plugins import load_exporter
    plugin = load_exporter(name)
    exporter = plugin() if isinstance(plugin, type) else plugin
    return exporter.export(snapshot, view=view, arch=arch)
