"""ufsgmem: the Linux guest_memfd uAPI emulated in userspace.

Layers (design §1, docs/design.md): :mod:`ufsgmem.uapi` (kernel constants), :mod:`ufsgmem.gmem` (the core
semantics), backends and exporters as plugins (:mod:`ufsgmem.plugins`), the FUSE frontend, and the CLI.
"""

from .address import FileOffset as FileOffset, GuestAddress as GuestAddress, PhysAddress as PhysAddress
from .address import Range as Range, parse_size as parse_size
from .backend import Backend as Backend, PhysExtent as PhysExtent
from .errors import GuestMemfdError as GuestMemfdError, PluginError as PluginError
from .gmem import GuestMemfd as GuestMemfd, HostFault as HostFault, PRIVATE as PRIVATE, SHARED as SHARED
from .snapshot import Snapshot as Snapshot

__version__ = "0.1.0"
