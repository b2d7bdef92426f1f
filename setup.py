"""Only what pyproject.toml cannot say: the cffi module over libfuse3 is compiled at install time."""

from setuptools import setup

setup(cffi_modules=["ufsgmem/fuse/_build.py:ffibuilder"])
