"""Differential conformance: the same behaviour cases on the real kernel guest_memfd and on ufsgmem.

* :mod:`.subjects` — the implementations under test (kernel via /dev/kvm, a ufsgmem mount, the core);
* :mod:`.mapping` — mmap(2) and accesses that may fault, run in forked children;
* :mod:`.cases` — the case table (design §7.6.1 rows, §7.2 and §7.3.2 errno tables; docs/design.md);
* :mod:`.deviations` — the documented differences, the only ones allowed;
* :mod:`.runner` — runs and judges; :mod:`.report` writes ``docs/compat.md`` from a run.

``python -m ufsgmem.conformance --write docs/compat.md`` regenerates the compatibility page.
"""
