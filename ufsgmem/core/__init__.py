"""The compiled core: the rules on the conversion path, in C, shared by the Python API and the server.

``_core`` (built by :mod:`ufsgmem.core._build` at install time through cffi) holds the C implementations of
the headers in this directory: ``runmap.h``, the run-length map behind attributes, pins, allocation and
the server's cached-page marks. They are in C because every conversion walks them and the Python versions
cost 1-2 µs a call (the C ones about 0.3 µs, most of it the cffi call); and they are in one place because
the FUSE server's C side compiles the same sources and is handed maps created here (by address), so there
is one owner of the behaviour and one struct layout. ``ufsgmem.runmap`` is the Python binding; import
that, not ``_core`` directly.

The headers are the contract: the cdef of ``_core`` is generated from them, so a declaration is written
once. Nothing in the core locks; the owner of a map does (cffi releases the GIL for every call, so an
unlocked map shared by threads is unsafe, not only inconsistent).
"""
