"""The exporter interface: pure functions from a frozen :class:`~ufsgmem.snapshot.Snapshot` to bytes.

Exporters are *consumers* (vm-memory's split): they read a snapshot and never change state, so the same
snapshot always gives the same output. They are plugins in entry-point group ``ufsgmem.exporters``;
``ufsgmem.plugins.export`` runs one by name. This module sits below the plugin registry: it defines what
an exporter must have, and the registry checks plugins against that (it imports nothing from there).
"""

from __future__ import annotations

import abc
import errno
from typing import ClassVar

from .errors import fail
from .layout import ARCHES, VIEWS, compute_layout


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
        check_choice(view, arch)
        return self.render(compute_layout(snapshot, view, arch), snapshot)


def check_choice(view: str, arch: str) -> None:
    """EINVAL naming the valid choices for an unknown view or arch."""
    if view not in VIEWS:
        raise fail(errno.EINVAL, f"unknown view {view!r}; available: {', '.join(VIEWS)}")
    if arch not in ARCHES:
        raise fail(errno.EINVAL, f"unknown arch {arch!r}; available: {', '.join(ARCHES)}")

