"""The built-in backends (``anon``, ``thp``, ``hugetlb``, ``sim``), one module each; the modules starting
with ``_`` are machinery they share. Each implements :class:`ufsgmem.backend.Backend` and is registered in
pyproject.toml under ``ufsgmem.backends``."""
