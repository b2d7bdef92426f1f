"""Argument types and error reporting shared by the client commands (create, destroy, convert, status).

Not a command itself (the leading underscore keeps :mod:`ufsgmem.cli` from listing it).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from ..address import parse_size
from ..errors import GuestMemfdError, errname


def size_arg(text: str) -> int:
    """argparse type: decimal, 0x hex or K/M/G/T; a clear message otherwise."""
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def split_file_path(path: str) -> tuple[str, str]:
    """``MOUNTPOINT/NAME`` → (mountpoint, name)."""
    path = path.rstrip("/")
    mount, name = os.path.split(path)
    return mount or ".", name


def report(command: str, run: Callable[[], int]) -> int:
    """Run ``run``; print a failed request as ``ufsgmem CMD: ERRNAME: message`` and return 1."""
    try:
        return run()
    except BrokenPipeError:  # `ufsgmem status ... | head`: the reader left; not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as exc:
        print(f"ufsgmem {command}: EINVAL: {exc}", file=sys.stderr)
        return 1
    except (GuestMemfdError, OSError) as exc:
        name = errname(exc.errno) if exc.errno is not None else type(exc).__name__
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"ufsgmem {command}: {name}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
