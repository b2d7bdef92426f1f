"""The backend interface: who owns the memory behind a guest_memfd file.

A backend is a *provider* (vm-memory's split): the core asks it for memory, reads and writes through it,
punches holes in it and asks where the memory physically is. It knows nothing about attributes, pins or
FUSE. Backends are plugins (entry-point group ``ufsgmem.backends``, see :mod:`ufsgmem.plugins`); the
built-in ones (``ufsgmem/builtin/backends/``) are registered in ufsgmem's own metadata and found exactly
like third-party ones.

Contract, for every backend:

* memory that was never used, or was punched, reads back as zeros (the kernel's zero-on-first-use rule
  then holds without the core copying anything);
* ``view``/``write`` work on any range inside the file; the core has already checked bounds, alignment
  and attributes, so a backend never sees bad input from the core;
* ``allocate`` makes a range present (faulting it in or reserving it); ``punch_hole`` frees it;
* ``physical_extents`` reports where allocated memory lives: real PFNs where the backend can read
  ``/proc/self/pagemap``, otherwise its own idea of contiguity. Unallocated memory is simply absent.
* errors are ``OSError`` with the kernel's errno (a pool too small for hugetlb is ENOMEM at creation,
  with a message naming the shortfall).

Optional capabilities have defaults that mean "not available" (vm-memory style): ``fileno()`` returns
None when there is no file descriptor to share, ``info()`` returns an empty dict.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, NamedTuple

#: progress(done_bytes, total_bytes), called from long operations such as preallocation.
Progress = Callable[[int, int], None]


class PhysExtent(NamedTuple):
    """File range ``[offset, offset + size)`` is backed by physical range ``[phys, phys + size)``."""

    offset: int
    phys: int
    size: int


class Backend(abc.ABC):
    """Base class of backend plugins. Subclasses set the class attributes and implement the methods."""

    #: The name users pass as ``--backend``; must equal the entry-point name.
    name: ClassVar[str]
    #: Folio (allocation unit) sizes this backend offers. A size above 4 KiB is the HugeTLB choice.
    page_sizes: ClassVar[tuple[int, ...]]
    #: Whether creation already allocates every page (hugetlb does: the pool is claimed up front).
    preallocates: ClassVar[bool] = False

    def __init__(self, size: int, page_size: int, *, progress: Progress | None = None, **options):
        self.size = size
        self.page_size = page_size
        self.options = options

    @abc.abstractmethod
    def view(self, offset: int, size: int) -> memoryview:
        """Bytes ``[offset, offset + size)``; zero-copy where possible. Valid until the next punch/close."""

    @abc.abstractmethod
    def write(self, offset: int, data) -> None:
        """Store ``data`` (any buffer) at ``offset``."""

    @abc.abstractmethod
    def allocate(self, offset: int, size: int) -> None:
        """Make ``[offset, offset + size)`` present. Content is unchanged (zero if never written)."""

    @abc.abstractmethod
    def punch_hole(self, offset: int, size: int) -> None:
        """Free ``[offset, offset + size)``; afterwards it reads as zeros."""

    @abc.abstractmethod
    def physical_extents(self) -> list[PhysExtent]:
        """Allocated memory as coalesced, offset-sorted physical extents."""

    @abc.abstractmethod
    def backend_bytes(self) -> int:
        """Bytes of memory this backend holds right now (what P6 measures)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Give every page back. Idempotent."""

    # --- optional capabilities ----------------------------------------------------------------------
    def fileno(self) -> int | None:
        """A file descriptor of the memory, if it has one (memfd backends)."""
        return None

    def memory_fd(self) -> int | None:
        """A descriptor whose MAP_SHARED mapping of ``[0, size)`` *is* the storage (what ``view`` reads and
        ``write`` changes), or None. With one, the server's compiled hot path serves page fills and
        write-backs of allocated pages from its own mapping of it, without calling the backend; without
        one, every request is served through ``view``/``write`` (slower, same answers). Only offer it if
        ``view``/``write`` do nothing but read and write that memory, and ``allocate`` only makes it present
        (the hot path allocates a written page by faulting it in through its mapping, which gets
        MADV_HUGEPAGE if the class sets ``memory_hugepage``)."""
        return None

    def fallocate_mapping(self) -> int | None:
        """With ``memory_fd()``: the address of the backend's own ``MAP_SHARED`` mapping of it, if
        ``allocate`` does nothing but ``MADV_POPULATE_WRITE`` of that mapping's range and ``punch_hole``
        nothing but ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` of the descriptor. The compiled hot path then serves
        ``fallocate(2)`` on ``mem`` by doing exactly that, without calling the backend; the mapping must
        stay until ``close()``. None (the default): every fallocate goes through ``allocate``/``punch_hole``."""
        return None

    def info(self) -> dict:
        """Backend-specific facts for ``status`` (e.g. whether THP really gave huge pages)."""
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: Methods a backend class must define; checked when the plugin is loaded.
REQUIRED_METHODS = ("view", "write", "allocate", "punch_hole", "physical_extents", "backend_bytes", "close")
REQUIRED_ATTRIBUTES = ("name", "page_sizes")
