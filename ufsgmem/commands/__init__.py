"""Subcommands of ``ufsgmem``; see :mod:`ufsgmem.cli` for the convention each module follows."""
