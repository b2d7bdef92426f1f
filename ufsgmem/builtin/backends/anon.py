"""Backend ``anon``: plain 4 KiB pages from a memfd (shmem), the kernel's upstream guest_memfd layout.

Caveat: physical extents come from ``/proc/self/pagemap`` and only cover pages present in the server's
own mapping; with 4 KiB pages the physical layout is whatever the page allocator handed out.
"""

from ufsgmem.uapi import SZ_4K

from ._memfd import MemfdBackend


class AnonBackend(MemfdBackend):
    name = "anon"
    page_sizes = (SZ_4K,)
