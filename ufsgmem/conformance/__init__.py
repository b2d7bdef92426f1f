"""Differential conformance: the same behaviour cases on the kernel's guest_memfd and on ufsgmem.

* :mod:`.subjects` — the implementations under test (kernel via /dev/kvm, a ufsgmem mount, the core);
* :mod:`.mapping` — mmap(2) and accesses that may fault, run in forked children;
* :mod:`.cases` — the case table (design §7.6.1 rows, §7.2 and §7.3.2 errno tables; docs/design.md);
* :mod:`.deviations` — the documented differences, the only ones allowed;
* :mod:`.record` — the kernel's observations kept per kernel (``records/linux-RELEASE.json``), the
  reference wherever the live kernel has no guest_memfd; :mod:`.transcribe` reads a generated page back
  into a record (how the first one was seeded);
* :mod:`.runner` — runs and judges against the live kernel or a record, and marks kernel changes;
  :mod:`.report` writes ``docs/compat.md`` from a run.

``python -m ufsgmem.conformance --write docs/compat.md`` regenerates the compatibility page;
``python -m ufsgmem.conformance --record``, on a kernel with guest_memfd, records that kernel.
"""
