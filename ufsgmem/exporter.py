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
