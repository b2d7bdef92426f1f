"""ufsgmem's built-in plugins: backends ``anon``, ``thp``, ``hugetlb``, ``sim`` (and the exporters).

This package is a distribution of its own (``plugins/pyproject.toml``) and is found only through its entry
points, exactly as a third-party plugin would be.
"""
