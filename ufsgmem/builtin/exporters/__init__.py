"""The built-in layout exporters (``json``, ``text``, ``png``, ``arm64-tables``), one module each. Each
module's ``EXPORTER`` implements :class:`ufsgmem.exporter.LayoutExporter` and is registered in
pyproject.toml under ``ufsgmem.exporters``."""
