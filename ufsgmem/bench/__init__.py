"""The benchmark suite behind ``ufsgmem bench`` (docs/design.md §5); see :mod:`ufsgmem.bench.suite`."""
