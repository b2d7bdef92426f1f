"""A minimal ufsgmem backend: the file's memory is one ``bytearray``.

It shows the whole contract in a few lines (see ``docs/backends.md``): zeros until written, ``punch_hole``
zeroes, ``physical_extents`` describes allocated memory, ``backend_bytes`` counts it. There is no real
physical memory behind a bytearray, so the extents use the file offset as the "physical" address (one
extent per allocated run), which is honest about contiguity and nothing else.

Caveats: the bytearray is the whole file, allocated at once, so keep files small; no ``fileno()``, so a
FUSE server serves it through ``view``/``write`` only.
"""

from ufsgmem.backend import Backend, PhysExtent

PAGE = 4096


class BytesBackend(Backend):
    name = "bytes"          # must equal the entry-point name
    page_sizes = (PAGE,)    # 4 KiB pages only

    def __init__(self, size, page_size, *, progress=None, **options):
        super().__init__(size, page_size, progress=progress, **options)
        self._data = bytearray(size)
        self._present = bytearray(size // PAGE)  # one flag per page: fine for a toy, not for 1 TiB

    def view(self, offset, size):
        return memoryview(self._data)[offset:offset + size]

    def write(self, offset, data):
        data = memoryview(data).cast("B")
        self._data[offset:offset + len(data)] = data

    def allocate(self, offset, size):
        self._present[offset // PAGE:(offset + size) // PAGE] = b"\1" * (size // PAGE)

    def punch_hole(self, offset, size):
        end = min(offset + size, self.size)
        self._data[offset:end] = bytes(end - offset)
        self._present[offset // PAGE:end // PAGE] = bytes((end - offset) // PAGE)

    def physical_extents(self):
        extents, start = [], None
        for page, flag in enumerate(bytes(self._present) + b"\0"):
            if flag and start is None:
                start = page
            elif not flag and start is not None:
                extents.append(PhysExtent(start * PAGE, start * PAGE, (page - start) * PAGE))
                start = None
        return extents

    def backend_bytes(self):
        return self._present.count(1) * PAGE

    def close(self):
        self._data = bytearray()
