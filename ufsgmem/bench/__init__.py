"""The benchmark suite behind ``ufsgmem bench`` (design §5); see :mod:`ufsgmem.bench.suite`."""
