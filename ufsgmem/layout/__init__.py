"""Stage-2 layouts: what a hypervisor's second-stage page tables would hold for a guest_memfd snapshot.

Public names (re-exported from the private modules):

* :func:`compute_layout` (snapshot, view, arch) -> :class:`Layout`;
* :data:`VIEWS` (``guest``, ``shared``, ``kvm``) and :data:`ARCHES` (name -> :class:`Arch`);
* the attribute codes ``SHARED``/``PRIVATE``/``MIXED`` and permission bits ``PERM_R/W/X``.

The rules of each view and the minimality argument are in ``docs/layout.md``.
"""

from .arch import ARCHES as ARCHES, Arch as Arch, LeafSize as LeafSize, get_arch as get_arch
from .compute import compute_layout as compute_layout
from .model import (
    PERM_R as PERM_R, PERM_W as PERM_W, PERM_X as PERM_X, Layout as Layout, Leaf as Leaf,
    perms_name as perms_name,
)
from .segments import (
    ATTRIBUTE_NAMES as ATTRIBUTE_NAMES, MIXED as MIXED, PRIVATE as PRIVATE, SHARED as SHARED, VIEWS as VIEWS,
)
