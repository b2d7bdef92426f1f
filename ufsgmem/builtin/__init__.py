"""ufsgmem's built-in plugins: the backends in ``backends/`` and the layout exporters in ``exporters/``.

They ship inside the ufsgmem distribution, so ``pip install .`` gives the whole tool, yet ufsgmem's own
code never imports them by name: pyproject.toml registers each under the entry-point groups
``ufsgmem.backends`` and ``ufsgmem.exporters``, and :mod:`ufsgmem.plugins` finds them there exactly as it
finds a third-party plugin (examples/minimal_backend is one). So the plugin API is exercised by the
project's own plugins on every run; a name missing from the metadata is missing from the tool.
"""
