"""Errors: one helper that raises the kernel's errno with a message that says what was wrong.

The kernel answers bad input with an errno; callers branch on it. So the core raises ``OSError`` with
exactly the errno the kernel would give, and a message for humans. Python maps some errnos onto
subclasses (ENOENT → FileNotFoundError), which is fine: ``exc.errno`` is the contract.

``GuestMemfdError`` adds ``error_offset`` for the cases where the kernel reports one (EAGAIN and ENOMEM
from KVM_SET_MEMORY_ATTRIBUTES2).
"""

from __future__ import annotations

import errno as _errno
import os


class GuestMemfdError(OSError):
    """An ``OSError`` that also carries the kernel's ``error_offset`` (a byte offset, page aligned)."""

    def __init__(self, err: int, detail: str, error_offset: int | None = None):
        super().__init__(err, f"{os.strerror(err)}: {detail}")
        self.detail = detail
        self.error_offset = error_offset


class PluginError(Exception):
    """A plugin is unknown, fails to load, or does not implement the interface."""


def fail(err: int, detail: str, error_offset: int | None = None) -> GuestMemfdError:
    """Return (for ``raise``) the error the kernel gives, with a message naming what was wrong."""
    return GuestMemfdError(err, detail, error_offset)


def errname(err: int) -> str:
    """``EINVAL`` for 22; a number when the errno has no name."""
    return _errno.errorcode.get(err, str(err))
