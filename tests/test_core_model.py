"""The core against a small reference model, driven by Hypothesis (a RuleBasedStateMachine).

The model is deliberately naive: a ``bytearray`` of the file, one attribute and one pin count per 4 KiB
page, one allocated flag per page. It is written from the rules (docs/design.md §7.2-§7.4, §2.4), not from
the core's code, and predicts for every call whether it succeeds or which errno it gives, the
``error_offset``, which ranges get revoked, and afterwards every byte of the file, every attribute, the
pins, the allocation and the status counters. After every step the whole content is compared byte for
byte, so a byte lost (a write not kept across a conversion) or leaked (a host read that sees private
memory, a punch that does not zero) fails the test at the step that caused it.

Runs on ``anon`` and ``sim`` with 4 KiB pages (16-page files), and with 2 MiB folios on ``sim`` and on
real ``hugetlb`` (2-folio files, page indices drawn around the folio boundary so splits and merges
happen). Invalid requests are generated on purpose: unaligned, empty, past EOF, wrong attributes or flags.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from conftest import reserved_hugepages
from ufsgmem import plugins
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd, HostFault
from ufsgmem.uapi import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE,
    SZ_2M, SZ_4K,
)

PS = PAGE_SIZE
MMAP, INIT_SHARED = GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_INIT_SHARED
U64_MAX = (1 << 64) - 1


class Model:
    """What the file should be: the kernel's rules applied to plain per-page lists."""

    def __init__(self, size: int, flags: int, unit: int, preallocated: bool):
        self.size, self.flags, self.unit = size, flags, unit
        self.npages, self.step = size // PS, unit // PS
        self.data = bytearray(size)
        self.attrs = [SHARED if flags & INIT_SHARED else PRIVATE] * self.npages
        self.pins = [0] * self.npages
        self.allocated = [preallocated] * self.npages
        self.counts = {"to_private": 0, "to_shared": 0, "noop": 0, "eagain": 0}
        self.revocations = self.revoked_bytes = self.punches = self.splits = self.merges = 0

    # --- derived facts ------------------------------------------------------------------------------
    def pages(self, offset: int, length: int) -> range:
        """The pages an access of ``length`` bytes at ``offset`` uses (none when it is empty)."""
        return range(offset // PS, -(-(offset + length) // PS)) if length > 0 else range(0)

    def touch(self, pages: range) -> None:
        """First use allocates the whole folio of every page used."""
        for p in pages:
            f = p - p % self.step
            for q in range(f, f + self.step):
                self.allocated[q] = True

    def whole_folios(self) -> int:
        if self.step == 1:
            return 0
        return sum(1 for f in range(0, self.npages, self.step)
                   if self.allocated[f] and all(a == PRIVATE for a in self.attrs[f:f + self.step]))

    def split_folios(self) -> int:
        if self.step == 1:
            return 0
        return sum(1 for f in range(0, self.npages, self.step) if self.allocated[f]) - self.whole_folios()

    def runs(self) -> list[tuple[int, int, int]]:
        runs: list[list[int]] = []
        for p, a in enumerate(self.attrs):
            if runs and runs[-1][2] == a:
                runs[-1][1] += PS
            else:
                runs.append([p * PS, PS, a])
        return [tuple(r) for r in runs]

    def shared_runs(self, first: int, last: int) -> tuple[tuple[int, int], ...]:
        out: list[list[int]] = []
        for p in range(first, last):
            if self.attrs[p] == SHARED:
                if out and out[-1][1] == p * PS:
                    out[-1][1] += PS
                else:
                    out.append([p * PS, (p + 1) * PS])
        return tuple(tuple(r) for r in out)

    # --- predictions: (errno or None, error_offset, revoked ranges); successful calls are applied -----
    def set_memory_attributes(self, offset, size, attributes, flags, reserved):
        if flags != 0 or any(reserved) or attributes & ~PRIVATE or attributes < 0:
            return errno.EINVAL, None, None
        if size == 0 or offset + size > U64_MAX:
            return errno.EINVAL, None, None
        if offset % PS or size % PS:
            return errno.EINVAL, None, None
        if offset >= self.size or offset + size > self.size:
            return errno.EINVAL, None, None
        first, last = offset // PS, (offset + size) // PS
        if all(a == attributes for a in self.attrs[first:last]):
            self.counts["noop"] += 1
            return None, None, None
        revoke = None
        if attributes == PRIVATE:
            pinned = next((p for p in range(first, last) if self.pins[p]), None)
            if pinned is not None:
                self.counts["eagain"] += 1
                return errno.EAGAIN, pinned * PS, None
            revoke = self.shared_runs(first, last)
            if revoke:
                self.revocations += 1
                self.revoked_bytes += sum(e - s for s, e in revoke)
        whole = self.whole_folios()
        self.attrs[first:last] = [attributes] * (last - first)
        if attributes == PRIVATE:
            self.counts["to_private"] += 1
            self.merges += self.whole_folios() - whole
        else:
            self.counts["to_shared"] += 1
            self.splits += whole - self.whole_folios()
        return None, None, revoke

    def fallocate(self, punch: bool, offset: int, length: int):
        if offset < 0 or length <= 0 or offset % self.unit or length % self.unit:
            return errno.EINVAL, None, None
        if not punch:
            if offset + length > self.size:
                return errno.EINVAL, None, None
            for p in range(offset // PS, (offset + length) // PS):
                self.allocated[p] = True
            return None, None, None
        end = min(offset + length, self.size)
        if offset >= end:
            return None, None, None
        self.data[offset:end] = bytes(end - offset)
        for p in range(offset // PS, end // PS):
            self.allocated[p] = False
        self.punches += 1
        self.revocations += 1
        self.revoked_bytes += end - offset
        return None, None, ((offset, end),)

    def pin_range_ok(self, offset, size) -> bool:
        return offset >= 0 and size > 0 and not offset % PS and not size % PS and offset + size <= self.size

    def pin(self, offset, size):
        if not self.pin_range_ok(offset, size):
            return errno.EINVAL, None
        if not self.flags & MMAP:
            return errno.EFAULT, offset
        pages = self.pages(offset, size)
        private = next((p for p in pages if self.attrs[p] == PRIVATE), None)
        if private is not None:
            return errno.EFAULT, private * PS
        self.touch(pages)
        for p in pages:
            self.pins[p] += 1
        return None, None

    def unpin(self, offset, size):
        if not self.pin_range_ok(offset, size) or any(self.pins[p] == 0 for p in self.pages(offset, size)):
            return errno.EINVAL
        for p in self.pages(offset, size):
            self.pins[p] -= 1
        return None

    def host_fault(self, offset, length) -> int | None:
        """Where the host access faults (SIGBUS at its first bad byte), or None: then it is a use."""
        if not self.flags & MMAP:
            return offset
        inside = self.pages(offset, min(offset + length, self.size) - offset) if offset < self.size else ()
        private = next((p for p in inside if self.attrs[p] == PRIVATE), None)
        if private is not None:
            return max(offset, private * PS)
        if offset + length > self.size:
            return max(offset, self.size)
        self.touch(self.pages(offset, length))
        return None

    def guest_access(self, offset, length) -> bool:
        if offset + length > self.size:
            return False
        self.touch(self.pages(offset, length))
        return True


def same_bytes(actual, expected, what: str) -> None:
    """Fail with the first differing offset, not with pytest's element-by-element diff of the two buffers:
    that diff is quadratic in their length (a 64 KiB mismatch took hours where CI leaves it untruncated)."""
    actual, expected = bytes(actual), bytes(expected)
    if actual == expected:
        return
    at = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
    pytest.fail(f"{what}: first difference at byte {at:#x} (page {at // PS}): "
                f"got {actual[at:at + 8].hex()}, expected {expected[at:at + 8].hex()} "
                f"(lengths {len(actual)}, {len(expected)})", pytrace=False)


def payload(seed: int, length: int) -> bytes:
    """Distinct-looking bytes, never all zero, so a write that went astray shows."""
    return ((np.arange(length, dtype=np.int64) * 131 + seed) % 255 + 1).astype(np.uint8).tobytes()


class CoreMachine(RuleBasedStateMachine):
    """Subclassed per environment with BACKEND, UNIT, UNITS and FLAGS set (see ``machine``)."""

    BACKEND = "anon"
    UNIT = SZ_4K
    SIZE = 16 * PS
    FLAG_CHOICES = (0, MMAP, MMAP | INIT_SHARED, INIT_SHARED)

    def __init__(self):
        super().__init__()
        self.g: GuestMemfd | None = None
        self.revoked: list[tuple[tuple[int, int], ...]] = []

    def record(self, ranges) -> None:
        """The revoker: remember what the core asked to unmap."""
        self.revoked.append(tuple((r.start, r.end) for r in ranges))

    # --- strategies ---------------------------------------------------------------------------------
    @classmethod
    def page_index(cls):
        npages, step = cls.SIZE // PS, cls.UNIT // PS
        if step == 1:
            return st.integers(0, npages)
        return st.one_of(st.integers(0, 6), st.integers(step - 4, step + 4), st.integers(npages - 6, npages))

    def near(self, data, pages: list[int]) -> int:
        """A page index, usually one of ``pages`` (pinned or shared ones) when there are any, so that
        pins, unpins and EAGAIN happen often rather than by luck."""
        if pages and data.draw(st.integers(0, 9)) < 7:
            return data.draw(st.sampled_from(pages))
        return data.draw(self.page_index())

    def pinned_pages(self) -> list[int]:
        return [p for p, c in enumerate(self.m.pins) if c]

    def shared_pages(self) -> list[int]:
        return [p for p, a in enumerate(self.m.attrs) if a == SHARED]

    # --- setup --------------------------------------------------------------------------------------
    @initialize(flags=st.sampled_from(range(4)))
    def create(self, flags):
        flags = self.FLAG_CHOICES[flags % len(self.FLAG_CHOICES)]
        self.g = GuestMemfd(self.SIZE, flags, backend=self.BACKEND, page_size=self.UNIT,
                            revoker=self.record)
        self.m = Model(self.SIZE, flags, self.UNIT, self.g.backend.preallocates)

    def teardown(self):
        if self.g is not None:
            self.g.close()

    # --- calling the core and comparing with the prediction ----------------------------------------
    def outcome(self, call, *args, **kwargs):
        """(errno or None, error_offset) of a core call."""
        try:
            call(*args, **kwargs)
        except HostFault:
            raise
        except OSError as exc:
            return exc.errno, getattr(exc, "error_offset", None)
        return None, None

    def check_revoked(self, expected):
        got, self.revoked = self.revoked, []
        assert got == ([expected] if expected else []), f"revoked {got}, expected {expected}"

    # --- rules --------------------------------------------------------------------------------------
    @rule(data=st.data(), to=st.sampled_from([PRIVATE, SHARED]),
          fault=st.sampled_from(["none"] * 12 + ["flags", "reserved", "attributes", "unaligned", "empty",
                                                "overflow"]))
    def convert(self, data, to, fault):
        first = self.near(data, self.pinned_pages() if to == PRIVATE else [])
        count = data.draw(st.one_of(st.integers(1, 6), st.just(self.m.npages - first)))
        offset, size, attributes, flags, reserved = first * PS, count * PS, to, 0, ()
        if fault == "flags":
            flags = data.draw(st.sampled_from([1, 2, 1 << 63]))
        elif fault == "reserved":
            reserved = (0,) * data.draw(st.integers(0, 10)) + (data.draw(st.integers(1, 9)),)
        elif fault == "attributes":
            attributes = data.draw(st.sampled_from([1, 4, 0x10, PRIVATE | 1, 1 << 63]))
        elif fault == "unaligned":
            offset += data.draw(st.sampled_from([0, 1, PS - 1]))
            size += data.draw(st.sampled_from([1, PS - 1]))
        elif fault == "empty":
            size = 0
        elif fault == "overflow":
            offset = U64_MAX - data.draw(st.integers(0, 3)) * PS - PS + 1
        expected_err, expected_off, revoke = self.m.set_memory_attributes(offset, size, attributes, flags,
                                                                           reserved)
        got = self.outcome(self.g.set_memory_attributes, offset, size, attributes, flags, reserved)
        assert got == (expected_err, expected_off), f"convert({offset:#x}, {size:#x}, {attributes}): {got}"
        self.check_revoked(revoke)

    @rule(data=st.data(), punch=st.booleans(), odd=st.sampled_from([0] * 5 + [1, PS]))
    def fallocate(self, data, punch, odd):
        units = self.m.size // self.m.unit
        offset = data.draw(st.integers(0, units + 1)) * self.m.unit + odd
        length = data.draw(st.integers(0, 2)) * self.m.unit
        expected_err, _, revoke = self.m.fallocate(punch, offset, length)
        mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0)
        assert self.outcome(self.g.fallocate, mode, offset, length) == (expected_err, None)
        self.check_revoked(revoke)

    @rule(data=st.data(), odd=st.sampled_from([0] * 15 + [1]))
    def pin(self, data, odd):
        first = self.near(data, self.shared_pages())
        count = data.draw(st.sampled_from([1, 1, 1, 2, 3, 0]))
        offset, size = first * PS + odd, count * PS
        assert self.outcome(self.g.pin, offset, size) == self.m.pin(offset, size)

    @rule(data=st.data())
    def unpin(self, data):
        first = self.near(data, self.pinned_pages())
        count = data.draw(st.sampled_from([1, 1, 1, 2, 0]))
        expected = self.m.unpin(first * PS, count * PS)
        assert self.outcome(self.g.unpin, first * PS, count * PS) == (expected, None)

    def _span(self, data):
        page = data.draw(self.page_index())
        offset = page * PS + data.draw(st.sampled_from([0, 0, 1, PS - 3, PS // 2]))
        length = data.draw(st.sampled_from([0, 1, 8, PS, PS + 5, 2 * PS, 3 * PS]))
        return offset, length

    @rule(data=st.data(), seed=st.integers(0, 254))
    def host_write(self, data, seed):
        offset, length = self._span(data)
        blob = payload(seed, length)
        fault = self.m.host_fault(offset, length)
        if fault is None:
            self.g.host_write(offset, blob)
            self.m.data[offset:offset + length] = blob
        else:
            with pytest.raises(HostFault) as info:
                self.g.host_write(offset, blob)
            assert info.value.offset == fault, "SIGBUS at the first byte the host may not touch"

    @rule(data=st.data())
    def host_read(self, data):
        offset, length = self._span(data)
        fault = self.m.host_fault(offset, length)
        if fault is None:
            same_bytes(self.g.host_read(offset, length), self.m.data[offset:offset + length], "host read")
        else:
            with pytest.raises(HostFault) as info:
                self.g.host_read(offset, length)
            assert info.value.offset == fault, "SIGBUS at the first byte the host may not touch"

    @rule(data=st.data(), seed=st.integers(0, 254))
    def guest_write(self, data, seed):
        offset, length = self._span(data)
        blob = payload(seed, length)
        if self.m.guest_access(offset, length):
            self.g.guest_write(offset, blob)
            self.m.data[offset:offset + length] = blob
        else:
            assert self.outcome(self.g.guest_write, offset, blob) == (errno.EINVAL, None)

    @rule(data=st.data())
    def guest_read(self, data):
        offset, length = self._span(data)
        if self.m.guest_access(offset, length):
            same_bytes(self.g.guest_read(offset, length), self.m.data[offset:offset + length], "guest read")
        else:
            assert self.outcome(self.g.guest_read, offset, length) == (errno.EINVAL, None)

    # --- invariants ---------------------------------------------------------------------------------
    @invariant()
    def every_byte(self):
        if self.g is None:
            return
        same_bytes(self.g.backend.view(0, self.m.size), self.m.data, "content differs from the model")

    @invariant()
    def bookkeeping(self):
        if self.g is None:
            return
        g, m = self.g, self.m
        for runmap in (g._attrs, g._pins, g._allocated):
            runmap.check()
        assert g.get_attributes() == m.runs()
        assert [g._pins.value_at(p) for p in range(m.npages)] == m.pins
        assert g.pending is None
        s = g.status()
        private = m.attrs.count(PRIVATE) * PS
        assert (s["private_bytes"], s["shared_bytes"]) == (private, m.size - private)
        assert s["pinned_bytes"] == sum(1 for c in m.pins if c) * PS
        assert s["allocated_bytes"] == sum(m.allocated) * PS
        assert s["huge_folios"] == {"whole": m.whole_folios(), "split": m.split_folios()}
        assert s["conversions"] == m.counts
        assert (s["folio_splits"], s["folio_merges"]) == (m.splits, m.merges)
        assert (s["revocations"], s["revoked_bytes"], s["punches"]) == (m.revocations, m.revoked_bytes,
                                                                        m.punches)
        assert s["attribute_runs"] == len(m.runs())


ENVS = [
    pytest.param("anon", SZ_4K, id="anon"),
    pytest.param("sim", SZ_4K, id="sim"),
    pytest.param("sim", SZ_2M, id="sim-2M"),
    pytest.param("hugetlb", SZ_2M, id="hugetlb-2M", marks=pytest.mark.hugetlb),
]


@pytest.mark.parametrize("backend, unit", ENVS)
def test_core_matches_model(backend, unit):
    if backend not in plugins.available(plugins.BACKENDS):
        pytest.skip(f"backend {backend!r} is not installed")
    machine = type(f"CoreMachine_{backend}_{unit}", (CoreMachine,), {
        "BACKEND": backend, "UNIT": unit, "SIZE": 16 * PS if unit == SZ_4K else 2 * unit,
        "FLAG_CHOICES": (0, MMAP, MMAP | INIT_SHARED, INIT_SHARED) if unit == SZ_4K else (0, MMAP),
    })
    options = settings(max_examples=150 if unit == SZ_4K else 60, stateful_step_count=40, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    if backend == "hugetlb":
        with reserved_hugepages(unit, 4):
            run_state_machine_as_test(machine, settings=options)
    else:
        run_state_machine_as_test(machine, settings=options)


class LosesWrites(GuestMemfd):
    """Drops the bytes of guest writes that start one byte into a page (checks and allocation still run)."""

    def guest_write(self, offset, data):
        if offset % PS == 1:
            self.access(offset, len(data), host=False, write=True)
            return
        super().guest_write(offset, data)


class LeaksPrivate(GuestMemfd):
    """Lets the host read private memory inside the file."""

    def host_read(self, offset, size):
        try:
            return super().host_read(offset, size)
        except HostFault:
            if self.flags & MMAP and offset + size <= self.size:
                return self.guest_read(offset, size)
            raise


class PunchKeepsData(GuestMemfd):
    """Forgets to free (and so zero) punched memory."""

    def _punch(self, rng):
        self._allocated.set(rng.start // PS, rng.end // PS, 0)
        self.counters.punches += 1


@pytest.mark.parametrize("broken, symptom", [
    (LosesWrites, "content differs from the model"),
    (LeaksPrivate, "DID NOT RAISE"),
    (PunchKeepsData, "content differs from the model"),
], ids=["lost-byte", "leaked-byte", "punch-keeps-data"])
def test_model_catches_a_broken_core(broken, symptom):
    """The machine is only worth something if it fails on a broken core: break it three ways and see."""

    class Machine(CoreMachine):
        @initialize(flags=st.sampled_from(range(4)))
        def create(self, flags):
            flags = (0, MMAP, MMAP | INIT_SHARED, INIT_SHARED)[flags]
            self.g = broken(self.SIZE, flags, backend="anon",
                            revoker=self.record)
            self.m = Model(self.SIZE, flags, SZ_4K, False)

    with pytest.raises((AssertionError, pytest.fail.Exception), match=symptom):
        run_state_machine_as_test(Machine, settings=settings(
            max_examples=300, stateful_step_count=40, deadline=None, database=None, print_blob=False,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
