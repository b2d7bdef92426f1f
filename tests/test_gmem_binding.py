"""ufsgmem/gmem.py as a binding over ufsgmem/core/gmem.c: what the binding itself adds.

The rules are tested by test_core_model.py and test_core_selftests.py; here: who frees the ``struct gmem``
(the refcount the FUSE side shares), what is left after ``close()``, that the C error record alone gives
the same message as the exception (what the FUSE extension reports), and that integers no int64 holds
get the answer they got when the rules were Python (the binding maps them to values failing the same
check, and formats the message from the caller's own values).
"""

from __future__ import annotations

import errno

import pytest

from ufsgmem.core._core import ffi, lib
from ufsgmem.errors import GuestMemfdError
from ufsgmem.address import Range
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd, HostFault, TransitionPending, message
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE

PS = PAGE_SIZE
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


def test_the_last_holder_frees_the_struct():
    """close() drops the binding's reference only: a holder that took its own (the FUSE side, gmem_get)
    keeps the struct, state and all, until its gmem_put, which is then the one that frees."""
    g = GuestMemfd(4 * PS, MMAP_SHARED)
    g.set_memory_attributes(PS, PS, PRIVATE)
    gm = ffi.cast("struct gmem *", g.address)
    assert gm.refs == 1 and gm.size == 4 * PS
    lib.gmem_get(gm)
    g.close()
    assert gm.refs == 1, "the binding's reference went, the other holder's stayed"
    assert lib.runmap_value_at(gm.attrs, 1) == PRIVATE and gm.counters.to_private == 1
    assert lib.gmem_put(gm) == 1, "the last put frees"


def test_after_close_counters_stay_and_the_maps_are_out_of_reach():
    g = GuestMemfd(4 * PS, MMAP_SHARED)
    g.set_memory_attributes(0, PS, PRIVATE)
    g.close()
    g.close()  # idempotent
    assert g.counters.to_private == 1 and g.pending is None
    for call in (lambda: g.attribute_at(0), lambda: g.host_read(0, 1), g.status):
        with pytest.raises((TypeError, AttributeError)):  # never a read of freed memory
            call()


def test_a_dropped_file_frees_its_struct_without_close():
    """The finaliser drops the binding's reference when close() was never called."""
    g = GuestMemfd(4 * PS, MMAP_SHARED)
    gm = ffi.cast("struct gmem *", g.address)
    lib.gmem_get(gm)
    del g
    assert gm.refs == 1
    assert lib.gmem_put(gm) == 1


def test_the_error_record_alone_gives_the_message():
    """message(gm, err) is what a caller holding only the C struct and its gmem_err would say."""
    g = GuestMemfd(4 * PS, MMAP_SHARED)
    gm = ffi.cast("struct gmem *", g.address)
    e = ffi.new("struct gmem_err *")
    assert lib.gmem_check_fallocate(gm, FALLOC_FL_KEEP_SIZE, PS, 8 * PS, e) == -errno.EINVAL
    with pytest.raises(GuestMemfdError) as info:
        g.allocate(PS, 8 * PS)
    assert info.value.detail == message(g, e)
    g.pin(0, PS)
    assert lib.gmem_prepare_set_memory_attributes(gm, 0, PS, PRIVATE, 0, ffi.NULL, 0, e) == -errno.EAGAIN
    assert (e.has_offset, e.offset, message(g, e)) == (1, 0, "page 0x0 is pinned; unpin it and retry")
    assert g.counters.eagain == 1, "the C call counted it"
    g.close()


@pytest.mark.parametrize("call, err, detail", [
    (lambda g: g.pin(1 << 64, PS), errno.EINVAL, "range [0x10000000000000000, 0x10000000000001000) runs past EOF"),
    (lambda g: g.pin(-(1 << 70), PS), errno.EINVAL, f"offset {-(1 << 70):#x} and size 0x1000 must be page "
                                                    "aligned, size > 0"),
    (lambda g: g.allocate(1 << 64, PS), errno.EFBIG, "offset + length 0x10000000000001000 exceeds the largest "
                                                     "file offset"),
    (lambda g: g.fallocate(1 << 64, 0, PS), errno.EOPNOTSUPP, "mode 0x10000000000000000 is not a fallocate "
                                                              "mode the VFS accepts"),
    (lambda g: g.set_memory_attributes(1 << 64, PS, SHARED), errno.EINVAL,
     "size 0x1000 at offset 0x10000000000000000: empty or wrapping range"),
    (lambda g: g.set_memory_attributes(0, PS, SHARED, flags=1 << 64), errno.EINVAL,
     "flags 0x10000000000000000 must be 0"),
    (lambda g: g.set_memory_attributes(0, PS, 1 << 64), errno.EINVAL,
     "attributes 0x10000000000000000: only private (0x8) or shared (0) exist"),
    (lambda g: g.set_memory_attributes(0, PS, SHARED, reserved=(0, 1 << 64)), errno.EINVAL,
     "reserved fields must be 0"),
    (lambda g: g.get_attributes(1 << 64, PS), errno.EINVAL,
     "range [0x10000000000000000, 0x10000000000001000) is empty or runs past the end of the 16K file"),
    (lambda g: g.guest_read(1 << 64, 1), errno.EINVAL,
     "guest access [0x10000000000000000, 0x10000000000000001) outside the 16K file"),
    (lambda g: GuestMemfd(1 << 64), errno.EINVAL, f"size {1 << 64} must be positive"),
    (lambda g: GuestMemfd(PS, 1 << 64), errno.EINVAL,
     "unknown flag bits 0x10000000000000000 (supported: mmap=0x1, init_shared=0x2)"),
])
def test_integers_past_int64_get_the_answer_they_always_got(call, err, detail):
    with GuestMemfd(4 * PS, MMAP_SHARED) as g:
        with pytest.raises(GuestMemfdError) as info:
            call(g)
        assert (info.value.errno, info.value.detail) == (err, detail)


def test_a_host_access_past_int64_faults_where_it_starts():
    with GuestMemfd(4 * PS, MMAP_SHARED) as g:
        with pytest.raises(HostFault) as info:
            g.host_read(1 << 70, 1)
        assert info.value.offset == 1 << 70
        assert info.value.detail == f"host access at {1 << 70:#x}: past the end of the 16K file"


def test_a_punch_pending_in_c_alone_is_transition_pending_with_its_range():
    """The server's compiled hot path prepares a punch through the core with no Python Transition: a host
    fill of the range must still say which range is being punched (mem.py reads around it), not a bare
    EAGAIN, which a page fault would take as SIGBUS."""
    g = GuestMemfd(8 * PS, MMAP_SHARED)
    try:
        assert lib.gmem_prepare_punch(ffi.cast("struct gmem *", g.address), 2 * PS, 3 * PS) == 1
        with pytest.raises(TransitionPending) as exc:
            g.host_fill(0, 8 * PS)
        assert exc.value.range == Range(2 * PS, 5 * PS) and exc.value.transition is None
        assert exc.value.errno == errno.EAGAIN and str(Range(2 * PS, 5 * PS)) in str(exc.value)
        assert bytes(g.host_fill(6 * PS, PS)) == bytes(PS)  # outside the punch: served
        lib.gmem_abort(ffi.cast("struct gmem *", g.address))
    finally:
        g.close()
