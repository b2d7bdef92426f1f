"""Only what pyproject.toml cannot say: the cffi modules are compiled at install time (the compiled core,
and the binding of libfuse3's low-level API)."""

from setuptools import setup

setup(cffi_modules=["ufsgmem/core/_build.py:ffibuilder", "ufsgmem/fuse/_build.py:ffibuilder"])
