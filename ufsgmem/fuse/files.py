"""The files of one mount, assembled: the one object ``ops.py`` calls, with plain byte offsets, from
libfuse's worker threads and the executor's (several at once; ``inodes.py`` says which lock guards what).

Each concern is its own module; this one only builds them over the mount's shared state and names their
entry points. It is not FUSE-free: revocations notify the kernel (``revoke.py``); the core
(``ufsgmem/gmem.py``) is.

=====================  ========================================================================
``mem.py``             ``mem``'s page-cache traffic: fills, write-backs, reads around a punch
``transitions.py``     the transition runner, revocation and write-back, cached-range bookkeeping
``private.py``         the private view (``ufsgmem run``): private pages only
``guest.py``           the guest view: pread/pwrite of every page, coherent with host mappings
``conversions.py``     ioctl(KVM_SET_MEMORY_ATTRIBUTES2), fallocate(2) and their ``ctl`` forms
``control.py``         ``MOUNTPOINT/ctl``, ``NAME/ctl``, ``status``, ``snapshot``
=====================  ========================================================================
"""

from __future__ import annotations

import functools

from .budget import Charges, MemoryBudget
from .control import Control, give_back
from .conversions import Conversions
from .fastpath import FastPath
from .guest import GuestView
from .inodes import Namespace
from .latency import LatencyHold
from .mem import Mem
from .private import PrivateView
from .revoke import InodeInvalidator, WriteBackFiles
from .transitions import Transitions
from .users import UserLimits, Users


class Files:
    """The files of one mount, built complete: ``invalidator`` revokes ranges from the kernel's page cache
    (None: nothing is ever cached, as in tests without a mount), ``mountpoint`` lets revocations write back
    in bulk through a descriptor of our own, ``latency`` is the mount's ``latency.LatencyHold`` under
    --low-latency (reported in status), ``fast`` the session's compiled hot path (None: no session; every
    mem file and handle is registered with it, and its counters are reported in status). It makes its own :class:`Namespace`, whose users are its charges'
    and whose freed files give their charge back (``control.give_back``)."""

    def __init__(self, invalidator: InodeInvalidator | None, *, mountpoint: str | None = None,
                 latency: LatencyHold | None = None, default_backend: str = "anon", in_place_conversion: bool = True,
                 max_memory: int | None = None, per_user: UserLimits | None = None, fast: FastPath | None = None):
        #: what the mount has committed, against --max-memory (``budget.py``)
        self.charges = Charges(MemoryBudget(max_memory), Users(per_user, max_memory=max_memory))
        self.ns = Namespace(self.charges.users, on_free=functools.partial(give_back, self.charges), fast=fast,
                            counters=lambda uid: (self.charges.users.memory_counter(uid),
                                                  self.charges.budget.counter))
        # our own descriptor of each mem, for bulk write-back (C's conversions get a dup of it)
        self.write_back_files = WriteBackFiles(hand_over=self._write_back_changed)
        self.transitions = Transitions(invalidator, self.charges, mountpoint=mountpoint,
                                       write_back_files=self.write_back_files)
        self.mem = Mem(self.charges)
        self.private = PrivateView(self.charges, self.transitions)
        self.guest = GuestView(self.charges, self.transitions)
        self.conversions = Conversions(self.charges, self.transitions, self.private)
        self.control = Control(self.ns, self.charges, self.conversions, self.write_back_files, latency=latency, fast=fast,
                               default_backend=default_backend, in_place_conversion=in_place_conversion)

        # what ops.py calls, by file
        self.mem_read, self.mem_write = self.mem.read, self.mem.write
        self.private_read, self.private_write = self.private.read, self.private.write
        self.guest_read, self.guest_write = self.guest.read, self.guest.write
        self.ioctl, self.fallocate = self.conversions.ioctl, self.conversions.fallocate
        self.set_memory_attributes = self.conversions.set_memory_attributes
        self.file_request, self.mount_request = self.control.file_request, self.control.mount_request
        self.status, self.snapshot = self.control.status, self.control.snapshot
        self.run_transition, self.drop_cache = self.transitions.run_transition, self.transitions.drop_cache

    def _write_back_changed(self, dir_ino: int, fd: int | None) -> bool:
        """The write-back descriptor of a file was opened (fd) or dropped (None): its ``FastFile`` owns it
        (the compiled path's conversions write back through it too). False if the file is gone (freed: C
        closed its descriptor then)."""
        entry = self.ns.entry_of(dir_ino)
        if entry is None:
            return False
        entry.file.set_write_back(fd)
        return True
