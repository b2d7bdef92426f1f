"""The calls that change a file's attributes or allocation: ``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)`` and
``fallocate(2)`` on ``mem``, and the ``set_memory_attributes``/``allocate``/``punch_hole`` requests of
``NAME/ctl`` (``control.py``), which take the same path.

Each checks first what the kernel checks first, with its errno (the core's ``check_*``/``prepare_*``),
charges what an allocation will commit (ENOMEM past ``--max-memory``, ``budget.py``), then hands the
transition to ``transitions.py``'s runner, all under ``Entry.lock``. A private→shared conversion first
closes the range in the private view (``private.py``).
"""

from __future__ import annotations

import errno

from .. import protocol
from ..errors import fail
from ..gmem import SHARED
from ..uapi import FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2
from .budget import Charges
from .inodes import Entry
from .private import PrivateView
from .transitions import Transitions


class Conversions:
    """Conversions, allocations and punch-holes of one mount's files."""

    def __init__(self, charges: Charges, transitions: Transitions, private: PrivateView):
        self.charges = charges
        self.transitions = transitions
        self.private = private

    def ioctl(self, entry: Entry, cmd: int, arg: bytes, *, compat: bool, writable: bool) -> tuple[int, bytes]:
        """guest_memfd's ioctl (v8): ``(0, b"")`` on success (nothing is copied back), ``(-errno, struct)``
        where the kernel copies the struct back (EAGAIN, ENOMEM: ``error_offset`` set); other errors raise.
        """
        if cmd != KVM_SET_MEMORY_ATTRIBUTES2 or not entry.in_place_conversion:
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not a guest_memfd ioctl here")
        if compat:  # a 32-bit caller: v8 sets no compat_ioctl, so the VFS answers it ENOTTY
            raise OSError(errno.ENOTTY, "guest_memfd has no 32-bit compat ioctl")
        if not writable:
            raise OSError(errno.EBADF, "the file is not open for writing")
        if len(arg) != KVM_MEMORY_ATTRIBUTES2_STRUCT.size:
            raise OSError(errno.EINVAL, f"kvm_memory_attributes2 is 128 bytes, got {len(arg)}")
        request = protocol.parse_attributes2(arg)
        try:
            self.set_memory_attributes(entry, request)
        except OSError as exc:
            offset = getattr(exc, "error_offset", None)
            if offset is None:
                raise
            return -exc.errno, protocol.with_error_offset(arg, offset)
        return 0, b""

    def fallocate(self, entry: Entry, mode: int, offset: int, length: int) -> None:
        """fallocate(2) after the VFS's checks: guest_memfd's own (core), then allocate or punch."""
        gm = entry.gm
        with entry.lock:
            with entry.state:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    transition = gm.prepare_fallocate(mode, offset, length)
                else:  # the kernel's checks first, then ENOMEM past --max-memory, then allocate
                    gm.check_fallocate(mode, offset, length)
                    transition = self.charges.committing(entry, offset, length,
                                                         lambda: gm.prepare_fallocate(mode, offset, length))
            self.transitions.run_transition(entry, transition)

    def set_memory_attributes(self, entry: Entry, req: protocol.FileRequest) -> None:
        if not entry.in_place_conversion:
            raise fail(errno.ENOTTY, "this file plays a kernel without in-place conversion "
                                     "(gmem_in_place_conversion=0)")
        gm = entry.gm
        with entry.lock:
            closing = req.attributes == SHARED and self.private.close(entry, req.offset, req.size)
            try:
                with entry.state:
                    transition = gm.prepare_set_memory_attributes(req.offset, req.size, req.attributes,
                                                                  req.flags, req.reserved)
            finally:
                if closing:
                    with entry.state:
                        entry.private_closing = None
            self.transitions.run_transition(entry, transition)
