"""A worked VMM on ufsgmem: a real KVM vCPU whose RAM is a guest_memfd file of a ufsgmem mount.

    python examples/vmm/vmm.py [--mount MNT] [--backend auto|anon|hugetlb] [--cpl 3|0] [--out DIR]

What it does (each step is checked and listed in the summary; the exit status is 0 only if every step
behaved as expected, 1 otherwise, 2 when the example cannot run here at all):

* creates ``MNT/vmm0``: 16 MiB, flag ``mmap`` (no ``init_shared``: all memory is private at creation, as
  for a confidential guest), on hugetlb 2 MiB pages when the pool can be grown (given back at the end),
  else on anonymous 4 KiB pages; without ``--mount`` it mounts a temporary directory itself;
* maps ``MNT/vmm0/mem`` ``MAP_SHARED`` and registers that mapping as KVM memslot 0 at guest physical 0
  (``KVM_SET_USER_MEMORY_REGION``); first it shows that KVM refuses the file as a guest_memfd memslot;
* makes the boot window shared and loads a hand-assembled 64-bit guest (guest.py) and its page tables;
* runs a real vCPU. The guest asks for conversions with a MapGPA-like port I/O "hypercall" (port 0xE0:
  gpa, size, shared/private/discard); the VMM converts with ``ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)``
  and discards with ``fallocate(mem, KEEP_SIZE|PUNCH_HOLE)``, and returns 0 or -errno in RAX;
* rings a device doorbell (port 0xE1): a separate device process (device.py) that maps ``mem`` itself
  reads the buffer -- it succeeds on shared buffers and dies of SIGBUS on private ones (the VMM reports
  the death and starts a new device);
* at the end exports the stage-2 layout of the file (``ufsgmem layout --view kvm``, json and png).

What a vCPU can and cannot reach here -- the caveat that shapes this example:

* The kernel binds a memslot to guest_memfd only for its *own* guest_memfd files
  (``KVM_SET_USER_MEMORY_REGION2`` with ``KVM_MEM_GUEST_MEMFD`` on ``mem`` fails with EINVAL). So KVM
  reaches guest RAM through the VMM's host mapping of ``mem``, like any plain memslot.
* Shared pages: the vCPU reads and writes them directly; the VMM, the device and the guest are coherent.
* Private pages: ufsgmem revokes them from every host mapping, KVM's included, so the vCPU cannot reach
  them either. What KVM does then was measured here (6.18, KVM on PVM; README.md has the details): when
  the CPU executes the access, ``KVM_RUN`` fails with EFAULT (exit_reason KVM_EXIT_UNKNOWN, no
  memory-fault data although KVM_CAP_MEMORY_FAULT_INFO is 1), RIP still on the access; when KVM's
  instruction emulator performs it (all CPL-0 code under PVM), it is a ``KVM_EXIT_MMIO`` for the private
  address. No signal reaches the VMM either way. The VMM also accepts KVM_EXIT_MEMORY_FAULT with EFAULT,
  which kernels that fill it in would give (not seen here).
* So the guest-visible protection is emulated: the VMM completes such an access itself through
  ``MNT/NAME/guest`` (which reaches every page, standing in for the vCPU's access to private memory): it
  decodes the two instructions the guest uses, or serves the MMIO exit. On a kernel with gmem-backed
  memslots the vCPU would reach private memory directly and none of this would be needed. The guest's
  code and page tables must stay shared (the vCPU fetches and walks them through the host mapping).

Caveats: x86-64 only; needs /dev/kvm and FUSE (root or fusermount3); the guest is the few instructions in
guest.py, not an OS; the device is a Python stand-in for a device model; one vCPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import json
import mmap
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import guest as g
from ufsgmem import hugepages, kvm
from ufsgmem.client import GmemFile, Mount
from ufsgmem.errors import errname
from ufsgmem.syscalls import fallocate, mapping_address
from ufsgmem.uapi import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE, SZ_2M,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# --- the guest's RAM (guest physical = file offset: memslot 0 maps the whole file at GPA 0) ----------
RAM_GPA = 0x0
RAM_SIZE = 16 << 20
BOUNCE, BOUNCE_SIZE = 0x200000, 0x10000  # a 64 KiB DMA bounce buffer
SECRET = 0x400000  # one 4 KiB page of the guest's own
DISCARD, DISCARD_SIZE = 0x600000, 0x200000  # 2 MiB the guest gives back (huge-page aligned)
FILL = 0x5A
SECRET_VALUE = 0x5EC2E7ED
MARKER = 0xD15CA2D0

# --- KVM bits kvm.py does not name ------------------------------------------------------------------
KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_MEMORY_FAULT = 2, 6, 39
KVM_EXIT_IO_OUT = 1
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_GET_STATS_FD = 0xAECE
RUN_EXIT_REASON = 8  # offsets in struct kvm_run
RUN_UNION = 32
KVM_RUN_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data[8], len, is_write
KVM_RUN_MEMORY_FAULT = struct.Struct("<QQQ")  # flags, gpa, size
REGS = {"rax": 0, "rbx": 8, "rcx": 16, "rdx": 24, "rsi": 32, "rdi": 40, "rip": 128, "rflags": 136}


def say(text: str = "") -> None:
    print(text, flush=True)


class VmmError(Exception):
    """The run cannot go on (an exit the VMM cannot handle, a dead guest, a broken setup)."""


# --- the vCPU ---------------------------------------------------------------------------------------
class Vcpu:
    """One vCPU fd and its ``struct kvm_run`` mapping."""

    def __init__(self, vm: kvm.Vm, index: int = 0):
        self.fd = fcntl.ioctl(vm.fd, kvm.KVM_CREATE_VCPU, index)
        size = fcntl.ioctl(vm.kvm.fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run_area = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def run(self) -> int:
        """KVM_RUN once; the exit reason, or the OSError KVM_RUN failed with."""
        fcntl.ioctl(self.fd, kvm.KVM_RUN, 0)
        return self.exit_reason

    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self.run_area, RUN_EXIT_REASON)[0]

    def get_regs(self) -> bytearray:
        regs = bytearray(144)
        fcntl.ioctl(self.fd, kvm.KVM_GET_REGS, regs, True)
        return regs

    def set_regs(self, regs: bytearray) -> None:
        fcntl.ioctl(self.fd, kvm.KVM_SET_REGS, regs)

    @staticmethod
    def reg(regs: bytearray, name: str) -> int:
        return struct.unpack_from("<Q", regs, REGS[name])[0]

    @staticmethod
    def set_reg(regs: bytearray, name: str, value: int) -> None:
        struct.pack_into("<Q", regs, REGS[name], value & (1 << 64) - 1)

    def enter_long_mode(self, rip: int, cpl: int) -> None:
        sregs = bytearray(312)
        fcntl.ioctl(self.fd, kvm.KVM_GET_SREGS, sregs, True)
        g.long_mode_sregs(sregs, cpl)
        fcntl.ioctl(self.fd, kvm.KVM_SET_SREGS, sregs)
        regs = self.get_regs()
        self.set_reg(regs, "rip", rip)
        self.set_reg(regs, "rflags", g.initial_rflags(cpl))
        self.set_regs(regs)

    def stats(self) -> dict[str, int]:
        """The vCPU's binary statistics (KVM_GET_STATS_FD), or {} where the kernel has none."""
        try:
            fd = fcntl.ioctl(self.fd, KVM_GET_STATS_FD, 0)
        except OSError:
            return {}
        try:
            _flags, name_size, count, _id, desc_offset, data_offset = struct.unpack("<6I", os.pread(fd, 24, 0))
            width = 16 + name_size
            descs = os.pread(fd, width * count, desc_offset)
            found = {}
            for i in range(count):
                _f, _exp, size, offset, _bucket = struct.unpack_from("<IhHII", descs, i * width)
                name = descs[i * width + 16:(i + 1) * width].split(b"\0")[0].decode()
                if size == 1:
                    found[name] = struct.unpack("<Q", os.pread(fd, 8, data_offset + offset))[0]
            return found
        finally:
            os.close(fd)

    def close(self) -> None:
        self.run_area.close()
        os.close(self.fd)


def kernel_gmem_binds() -> str:
    """The same call with the kernel's own guest_memfd, in a throwaway VM: shows that the EINVAL above is
    about the file, not the VM type or the slot."""
    try:
        with kvm.Kvm() as k, k.create_vm(0) as vm:
            fd = vm.create_guest_memfd(RAM_SIZE, GUEST_MEMFD_FLAG_MMAP)
            scratch = mmap.mmap(-1, RAM_SIZE)
            try:
                vm.set_user_memory_region(1, 0x100000000, RAM_SIZE, mapping_address(scratch), guest_memfd=fd)
            finally:
                vm.close()  # the slot goes with the VM, before its memory
                scratch.close()
                os.close(fd)
    except OSError as exc:
        return f"(the same call with a kernel guest_memfd fails too here: {exc})"
    return "the same call with a kernel guest_memfd (KVM_CREATE_GUEST_MEMFD, flags mmap) -> 0"


# --- the device process -----------------------------------------------------------------------------
class Device:
    """device.py in its own process; ``dma_read`` is one request. Restarted after it dies."""

    def __init__(self, mem_path: str):
        self.mem_path = mem_path
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "device.py"), self.mem_path], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # Ctrl-C is the VMM's
        hello = self._answer()
        if not hello or not hello.get("ready"):
            raise VmmError(f"the device process did not start: {self._death()}")
        self.pids.append(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _answer(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def _death(self) -> str:
        code = self.proc.wait(timeout=10)
        err = self.proc.stderr.read().strip().splitlines()
        return (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}") \
            + (f" (stderr: {err[0]})" if err else "")

    def dma_read(self, offset: int, size: int) -> dict:
        """``{"ok": True, "values": {...}}``, or ``{"ok": False, "signal": N, "death": text}`` if it died."""
        pid = self.proc.pid
        try:
            self.proc.stdin.write(json.dumps({"op": "dma_read", "offset": offset, "size": size}) + "\n")
            self.proc.stdin.flush()
            answer = self._answer()
        except BrokenPipeError:
            answer = None
        if answer is not None:
            answer["pid"] = pid
            return answer
        death = self._death()
        code = self.proc.returncode
        self._reap()
        self.start()  # a VMM resets a device model that crashed
        return {"ok": False, "pid": pid, "signal": -code if code < 0 else None, "death": death,
                "restarted": self.proc.pid}

    def _reap(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    def close(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the device exits at end of input
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reap()
        self.proc = None


# --- what happened during a step --------------------------------------------------------------------
@dataclass
class Event:
    kind: str  # mapgpa | doorbell | report | private-access
    gpa: int = 0
    size: int = 0
    op: str = ""  # mapgpa: shared/private/discard; private-access: read/write
    result: int = 0  # mapgpa/doorbell: what RAX got (0 or -errno); report: the value
    how: str = ""  # private-access: what KVM did; mapgpa: the uAPI call
    value: int | None = None  # private-access: the value read or written through NAME/guest
    device: dict = field(default_factory=dict)  # doorbell: the device's answer


class Mismatch(Exception):
    """A step did not behave as expected."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Mismatch(message)


def only(events: list[Event], kind: str, count: int = 1) -> list[Event]:
    found = [e for e in events if e.kind == kind]
    expect(len(found) == count, f"expected {count} {kind} event(s), saw {len(found)}: {found}")
    return found


def errno_text(value: int) -> str:
    return "0" if value == 0 else f"-{errname(-value)}"


# --- the VMM ----------------------------------------------------------------------------------------
class Vmm:
    def __init__(self, gmem: GmemFile, mem_path: str, cpl: int, timeout: float):
        self.gmem, self.mem_path, self.cpl, self.timeout = gmem, mem_path, cpl, timeout
        self.kvm = self.vm = self.vcpu = self.ram = self.device = None
        self.step = 0
        self.events: dict[int, list[Event]] = collections.defaultdict(list)
        self.seen: dict[int, Seen] = {}
        self.memfd = gmem.fileno()

    # --- memory ------------------------------------------------------------------------------------
    def offset_of(self, gpa: int, size: int) -> int:
        """Memslot translation: guest physical -> offset in mem (the slot maps the whole file)."""
        if not (RAM_GPA <= gpa and gpa + size <= RAM_GPA + RAM_SIZE and size > 0):
            raise VmmError(f"[{gpa:#x}, +{size:#x}) is not guest RAM")
        return gpa - RAM_GPA

    def attribute(self, gpa: int, size: int) -> str:
        """shared, private or mixed: the attributes of the pages [gpa, gpa + size) touches."""
        first, end = gpa & ~0xFFF, (gpa + size + 0xFFF) & ~0xFFF
        runs = self.gmem.get_attributes(self.offset_of(first, end - first), end - first)
        found = {attributes for _o, _s, attributes in runs}
        return "private" if found == {KVM_MEMORY_ATTRIBUTE_PRIVATE} else "shared" if found == {0} else "mixed"

    # --- setup -------------------------------------------------------------------------------------
    def create_machine(self) -> list[tuple[str, bool, str]]:
        results = []
        self.kvm = kvm.Kvm()
        self.vm = self.kvm.create_vm(0)
        self.ram = mmap.mmap(self.memfd, RAM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        address = mapping_address(self.ram)
        # 1. would KVM take mem as a guest_memfd (a gmem-backed memslot)? Only its own files.
        try:
            self.vm.set_user_memory_region(1, 0x100000000, RAM_SIZE, address, guest_memfd=self.memfd)
        except OSError as exc:
            results.append(("KVM refuses mem as a guest_memfd memslot", exc.errno == errno.EINVAL,
                            f"KVM_SET_USER_MEMORY_REGION2(flags=KVM_MEM_GUEST_MEMFD, guest_memfd=<mem fd>) "
                            f"-> {errname(exc.errno)}: KVM binds only its own guest_memfd files, so it will "
                            f"reach guest RAM through the host mapping\n" + kernel_gmem_binds()))
        else:
            results.append(("KVM refuses mem as a guest_memfd memslot", False,
                            "KVM_SET_USER_MEMORY_REGION2(KVM_MEM_GUEST_MEMFD) on a ufsgmem file succeeded: "
                            "this kernel binds FUSE files, and the example's premises do not hold"))
        # 2. the plain memslot: guest RAM = the host mapping of mem
        self.vm.set_user_memory_region(0, RAM_GPA, RAM_SIZE, address)
        results.append(("guest RAM is memslot 0 = the VMM's MAP_SHARED mapping of mem", True,
                         f"KVM_SET_USER_MEMORY_REGION(slot 0, GPA {RAM_GPA:#x}, {RAM_SIZE >> 20} MiB, "
                         f"userspace_addr {address:#x}) -> 0"))
        # 3. the boot window must be shared: the vCPU fetches code and walks page tables through the mapping
        self.gmem.set_memory_attributes(0, g.BOOT_WINDOW, 0)
        for gpa, page in g.page_tables(RAM_SIZE).items():
            self.ram[gpa:gpa + len(page)] = page
        code = self.program()
        self.ram[g.CODE_GPA:g.CODE_GPA + len(code)] = code
        results.append(("boot window shared, guest loaded through the VMM's mapping",
                        self.attribute(0, g.BOOT_WINDOW) == "shared"
                        and self.gmem.guest_read(g.CODE_GPA, len(code)) == code,
                        f"[0, {g.BOOT_WINDOW:#x}) private->shared by ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2); "
                        f"{len(code)} bytes of code at {g.CODE_GPA:#x}, page tables at {g.PML4_GPA:#x}; "
                        f"NAME/guest reads the same bytes"))
        self.vcpu = Vcpu(self.vm)
        self.vcpu.enter_long_mode(g.CODE_GPA, self.cpl)
        self.device = Device(self.mem_path)
        results.append(("device process started; it maps mem itself", True,
                         f"device.py pid {self.device.pid}: mmap(MNT/NAME/mem, MAP_SHARED, PROT_READ)"))
        return results

    @staticmethod
    def program() -> bytes:
        """The guest: each step's code after a POST code with its number, then power off."""
        asm = g.Asm()
        for number, step in enumerate(STEPS, 1):
            asm.post(number)
            step.code(asm)
        asm.poweroff(0)
        return bytes(asm.code)

    # --- running -------------------------------------------------------------------------------------
    def run(self) -> int:
        """Run the guest until it powers off; its exit code."""
        deadline = time.monotonic() + self.timeout
        while True:
            if time.monotonic() > deadline:
                raise VmmError(f"the guest did not power off within {self.timeout:.0f} s (step {self.step})")
            try:
                reason = self.vcpu.run()
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if exc.errno == errno.EFAULT:
                    self.complete_faulted_access()
                    continue
                raise VmmError(f"KVM_RUN failed: {errname(exc.errno)} in step {self.step}") from None
            if reason == KVM_EXIT_IO:
                done = self.handle_io()
                if done is not None:
                    return done
            elif reason == KVM_EXIT_MMIO:
                self.handle_mmio()
            else:
                regs = self.vcpu.get_regs()
                raise VmmError(f"unexpected exit {kvm.KVM_EXIT_NAMES.get(reason, reason)} at rip "
                               f"{Vcpu.reg(regs, 'rip'):#x} in step {self.step}")

    def handle_io(self) -> int | None:
        direction, size, port, count, data_offset = kvm.KVM_RUN_IO.unpack_from(self.vcpu.run_area, RUN_UNION)
        data = int.from_bytes(self.vcpu.run_area[data_offset:data_offset + size], "little")
        if direction != KVM_EXIT_IO_OUT or count != 1:
            raise VmmError(f"unexpected port I/O: direction {direction}, port {port:#x}, count {count}")
        if port == g.PORT_POST:
            self.end_step()
            self.step = data & 0xFF
            return None
        if port == g.PORT_POWEROFF:
            self.end_step()
            return data & 0xFF
        if port == g.PORT_REPORT:
            self.events[self.step].append(Event("report", result=data & 0xFFFFFFFF))
            return None
        regs = self.vcpu.get_regs()
        gpa, length = Vcpu.reg(regs, "rbx"), Vcpu.reg(regs, "rcx")
        if port == g.PORT_MAPGPA:
            result = self.map_gpa(data & 0xFF, gpa, length)
        elif port == g.PORT_DOORBELL:
            result = self.doorbell(gpa, length)
        else:
            raise VmmError(f"OUT to unknown port {port:#x}")
        Vcpu.set_reg(regs, "rax", result)  # the hypercall's return value; RIP is left alone
        self.vcpu.set_regs(regs)
        return None

    def end_step(self) -> None:
        """Record the state the finished step left (attributes, its probe) for the checks after the run."""
        if not 1 <= self.step <= len(STEPS):
            return
        step = STEPS[self.step - 1]
        self.seen[self.step] = Seen(self.events[self.step],
                                    {name: self.attribute(gpa, size) for name, (gpa, size) in RANGES.items()},
                                    step.probe(self) if step.probe else None)

    def host_view(self, gpa: int, size: int) -> bytes | None:
        """The range through the VMM's own mapping -- only if it is shared: a private page would be SIGBUS
        in the VMM itself, which is exactly what guest_memfd promises."""
        if self.attribute(gpa, size) != "shared":
            return None
        return self.ram[gpa - RAM_GPA:gpa - RAM_GPA + size]

    def touch_in_child(self, gpa: int) -> str:
        """Read one byte at ``gpa`` through the VMM's own mapping, in a forked child (a SIGBUS there must not
        end the VMM): "no signal", or the name of the signal that killed the child."""
        pid = os.fork()
        if pid == 0:
            try:
                self.ram[gpa - RAM_GPA]
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else "no signal"

    def map_gpa(self, op: int, gpa: int, size: int) -> int:
        """The guest's conversion request, done with the uAPI on mem; 0 or -errno for the guest."""
        name = g.OP_NAMES.get(op, f"op {op}")
        event = Event("mapgpa", gpa, size, name)
        self.events[self.step].append(event)
        try:
            offset = self.offset_of(gpa, size)
            if op in (g.OP_SHARED, g.OP_PRIVATE):
                attributes = KVM_MEMORY_ATTRIBUTE_PRIVATE if op == g.OP_PRIVATE else 0
                event.how = f"ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2, {{{offset:#x}, {size:#x}, {attributes}}})"
                self.gmem.set_memory_attributes(offset, size, attributes)
            elif op == g.OP_DISCARD:
                event.how = f"fallocate(mem, KEEP_SIZE|PUNCH_HOLE, {offset:#x}, {size:#x})"
                fallocate(self.memfd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, size)
            else:
                raise OSError(errno.EINVAL, f"unknown MapGPA operation {op}")
        except VmmError:
            event.result = -errno.EINVAL
        except OSError as exc:
            event.result = -exc.errno
        return event.result

    def doorbell(self, gpa: int, size: int) -> int:
        """Hand [gpa, gpa + size) to the device process; 0, or -EFAULT if it could not read it."""
        answer = self.device.dma_read(self.offset_of(gpa, size), size)
        event = Event("doorbell", gpa, size, device=answer, result=0 if answer.get("ok") else -errno.EFAULT)
        self.events[self.step].append(event)
        return event.result

    # --- the guest's accesses to private memory, which KVM cannot make ------------------------------
    def complete_faulted_access(self) -> None:
        """KVM_RUN failed with EFAULT: the vCPU touched a page KVM could not get from the host mapping.

        Decode the instruction at RIP (the guest's code is shared; it is read through NAME/guest anyway,
        which never faults), check the address is really private (an EFAULT on shared memory is a real
        failure, not something to paper over), do the access through NAME/guest and step past it.
        """
        reason = self.vcpu.exit_reason
        regs = self.vcpu.get_regs()
        rip = Vcpu.reg(regs, "rip")
        # the guest's page tables map virtual = physical, so RIP and RBX are guest physical addresses
        insn = self.gmem.guest_read(self.offset_of(rip, g.ACCESS_LENGTH), g.ACCESS_LENGTH)
        if insn not in (g.LOAD_EAX_RBX, g.STORE_EAX_RBX):
            raise VmmError(f"KVM_RUN: EFAULT at rip {rip:#x} on {insn.hex()}, which the VMM does not complete")
        gpa = Vcpu.reg(regs, "rbx")
        how = f"KVM_RUN -> -1 EFAULT, exit_reason {kvm.KVM_EXIT_NAMES.get(reason, 'UNKNOWN')} ({reason})"
        if reason == KVM_EXIT_MEMORY_FAULT:
            _flags, fault_gpa, fault_size = KVM_RUN_MEMORY_FAULT.unpack_from(self.vcpu.run_area, RUN_UNION)
            how += f", memory_fault gpa {fault_gpa:#x} size {fault_size:#x}"
        how += f", rip {rip:#x} still on the access"
        value = self.emulate_private_access(gpa, 4, insn == g.STORE_EAX_RBX,
                                            Vcpu.reg(regs, "rax").to_bytes(8, "little")[:4], how)
        if insn == g.LOAD_EAX_RBX:
            Vcpu.set_reg(regs, "rax", int.from_bytes(value, "little"))  # a 32-bit load zero-extends
        Vcpu.set_reg(regs, "rip", rip + g.ACCESS_LENGTH)
        self.vcpu.set_regs(regs)

    def handle_mmio(self) -> None:
        """KVM_EXIT_MMIO on guest RAM: KVM's instruction emulator could not read or write the page through
        the host mapping, and reports it as MMIO. Serve it from NAME/guest like any MMIO exit."""
        phys, data, length, is_write = KVM_RUN_MMIO.unpack_from(self.vcpu.run_area, RUN_UNION)
        value = self.emulate_private_access(phys, length, bool(is_write), data[:length],
                                            f"KVM_EXIT_MMIO (phys_addr {phys:#x}, len {length}, "
                                            f"is_write {is_write}): KVM's instruction emulator made the access")
        if not is_write:
            self.vcpu.run_area[RUN_UNION + 8:RUN_UNION + 8 + length] = value  # KVM completes the load with it

    def emulate_private_access(self, gpa: int, size: int, write: bool, data: bytes, how: str) -> bytes:
        if (gpa & 0xFFF) + size > 0x1000:
            raise VmmError(f"a {size}-byte access at {gpa:#x} crosses a page")
        if self.attribute(gpa, size) != "private":
            raise VmmError(f"{how}: but {gpa:#x} is shared -- a real failure, not a private access")
        offset = self.offset_of(gpa, size)
        if write:
            self.gmem.guest_write(offset, data)
        else:
            data = self.gmem.guest_read(offset, size)
        self.events[self.step].append(Event("private-access", gpa, size, "write" if write else "read", how=how,
                                            value=int.from_bytes(data, "little")))
        return data

    # --- teardown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Device, vCPU, VM (its memslots), then the mapping the memslot pointed at. Idempotent."""
        if self.device is not None:
            self.device.close()
        if self.vcpu is not None:
            self.vcpu.close()
            self.vcpu = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.kvm is not None:
            self.kvm.close()
            self.kvm = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None


# --- the scenario: what the guest does in each step, and what must have happened -------------------
#: ranges whose attributes the VMM records at the end of every step (the checks run after the guest)
RANGES = {"bounce": (BOUNCE, BOUNCE_SIZE), "secret": (SECRET, 0x1000), "discard": (DISCARD, DISCARD_SIZE)}


@dataclass
class Seen:
    """What the VMM saw during one step: its exits, and the state when the step ended."""

    events: list[Event]
    attributes: dict[str, str]  # RANGES name -> shared/private/mixed
    probe: object = None  # what the step's probe returned


@dataclass
class Step:
    title: str
    code: Callable[[g.Asm], object]  # emits the guest's code for the step
    check: Callable[[Seen], str]  # after the run: a description, or raises Mismatch
    probe: Callable[[Vmm], object] | None = None  # the VMM looks at something when the step ends


def check_mapgpa(seen: Seen, op: str, name: str, result: int = 0, attribute: str | None = None,
                 gpa: int | None = None, size: int | None = None) -> str:
    gpa = RANGES[name][0] if gpa is None else gpa
    size = RANGES[name][1] if size is None else size
    (event,) = only(seen.events, "mapgpa")
    expect((event.op, event.gpa, event.size) == (op, gpa, size), f"unexpected request {event}")
    expect(event.result == result, f"{event.how} -> {errno_text(event.result)}, expected {errno_text(result)}")
    if attribute:
        expect(seen.attributes[name] == attribute, f"the {name} range is {seen.attributes[name]}, not {attribute}")
    return f"MapGPA({gpa:#x}, {size:#x}, {op}): {event.how} -> {errno_text(event.result)}, RAX = {event.result}"


def check_private_access(seen: Seen, op: str, gpa: int, value: int) -> str:
    accesses = [e for e in seen.events if e.kind == "private-access" and e.op == op]
    expect(len(accesses) == 1, f"expected one private {op} refused by KVM, saw {accesses}")
    (event,) = accesses
    expect(event.gpa == gpa and event.value == value,
           f"private {op} at {event.gpa:#x} of {event.value:#x}, expected {value:#x} at {gpa:#x}")
    return (f"vCPU {op} of {gpa:#x} (private): {event.how}; the VMM completed it through NAME/guest "
            f"({value:#010x})")


def check_no_exit_for_memory(seen: Seen) -> None:
    expect(not [e for e in seen.events if e.kind == "private-access"],
           "a vCPU access to shared memory exited to the VMM")


def check_report(seen: Seen, value: int) -> str:
    (event,) = only(seen.events, "report")
    expect(event.result == value, f"the guest read {event.result:#010x}, expected {value:#010x}")
    return f"the guest read {value:#010x}"


def check_device_ok(seen: Seen, gpa: int, size: int, expected: collections.Counter) -> str:
    (event,) = only(seen.events, "doorbell")
    answer = event.device
    expect(answer.get("ok") is True, f"the device could not read [{gpa:#x}, +{size:#x}): {answer}")
    values = collections.Counter({int(k, 16): n for k, n in answer["values"].items()})
    expect(values == expected, f"the device read {dict(values)}, expected {dict(expected)}")
    expect(event.result == 0, f"the guest got {errno_text(event.result)}, expected 0")
    shown = ", ".join(f"{n} x {v:#04x}" for v, n in sorted(values.items(), key=lambda kv: -kv[1]))
    return f"device pid {answer['pid']} read [{gpa:#x}, +{size:#x}) through its own mapping: {shown}"


def check_device_sigbus(seen: Seen, gpa: int, size: int) -> str:
    (event,) = only(seen.events, "doorbell")
    answer = event.device
    expect(not answer.get("ok") and answer.get("signal") == signal.SIGBUS,
           f"expected the device to die of SIGBUS, got {answer}")
    expect(event.result == -errno.EFAULT, f"the guest got {errno_text(event.result)}, expected -EFAULT")
    return (f"device pid {answer['pid']} touching [{gpa:#x}, +{size:#x}) through its mapping: "
            f"{answer['death']}; the guest got -EFAULT; device restarted as pid {answer['restarted']}")


WORD = FILL * 0x01010101


def _fill(seen: Seen) -> str:
    check_no_exit_for_memory(seen)
    expect(seen.probe == bytes([FILL]) * BOUNCE_SIZE, "the VMM's own mapping does not show the guest's writes")
    return (f"rep stosb: no exit for the memory; {check_report(seen, WORD)}; the VMM's own mapping shows "
            f"{BOUNCE_SIZE} x {FILL:#04x}")


def _malformed(seen: Seen) -> str:
    text = check_mapgpa(seen, "private", "bounce", -errno.EINVAL, "shared", gpa=BOUNCE + 1, size=0x1000)
    return text + "; the bounce buffer stays shared"


def _store_secret(seen: Seen) -> str:
    text = check_private_access(seen, "write", SECRET, SECRET_VALUE)
    expect(seen.attributes["secret"] == "private", "the secret page is not private")
    expect(seen.probe == SECRET_VALUE.to_bytes(4, "little"), f"NAME/guest shows {seen.probe!r}, not the secret")
    return text


def _load_secret(seen: Seen) -> str:
    return check_private_access(seen, "read", SECRET, SECRET_VALUE) + "; " + check_report(seen, SECRET_VALUE)


def _unshare(seen: Seen) -> str:
    text = check_mapgpa(seen, "private", "bounce", 0, "private")
    expect(seen.probe == "SIGBUS", f"a read through the VMM's own mapping gave {seen.probe}, not SIGBUS")
    return text + "\na forked child of the VMM reading it through the VMM's mapping: killed by SIGBUS"


def _load_bounce(seen: Seen) -> str:
    return (check_private_access(seen, "read", BOUNCE, WORD) + "\n(the vCPU wrote this page in step 2: the "
            "revocation reached KVM's mapping too); content preserved across shared->private: "
            + check_report(seen, WORD))


def _discard(seen: Seen) -> str:
    return "\n".join([
        check_private_access(seen, "write", DISCARD, MARKER),
        check_mapgpa(seen, "discard", "discard", 0, "private") + " (the attribute stays private)",
        check_private_access(seen, "read", DISCARD, 0) + "; " + check_report(seen, 0)
        + ": punched memory reads as zeros"])


def _share_secret(seen: Seen) -> str:
    share = check_mapgpa(seen, "shared", "secret", 0, "shared")
    check_no_exit_for_memory(seen)
    page = collections.Counter(SECRET_VALUE.to_bytes(4, "little") + bytes(0x1000 - 4))
    return "\n".join([share, "vCPU read it directly (no exit): " + check_report(seen, SECRET_VALUE)
                      + ", content preserved across private->shared", check_device_ok(seen, SECRET, 0x1000, page)])


STEPS = [
    Step("guest shares a 64 KiB bounce buffer (MapGPA shared)",
         lambda a: a.map_gpa(BOUNCE, BOUNCE_SIZE, g.OP_SHARED),
         lambda seen: check_mapgpa(seen, "shared", "bounce", 0, "shared")),
    Step("vCPU fills the shared buffer directly and reads it back",
         lambda a: a.fill(BOUNCE, BOUNCE_SIZE, FILL).load_and_report(BOUNCE + BOUNCE_SIZE - 4), _fill,
         probe=lambda vmm: vmm.host_view(BOUNCE, BOUNCE_SIZE)),
    Step("device DMA-reads the shared buffer (doorbell)",
         lambda a: a.doorbell(BOUNCE, BOUNCE_SIZE),
         lambda seen: check_device_ok(seen, BOUNCE, BOUNCE_SIZE, collections.Counter({FILL: BOUNCE_SIZE}))),
    Step("a malformed MapGPA (unaligned address) gets the kernel's errno",
         lambda a: a.map_gpa(BOUNCE + 1, 0x1000, g.OP_PRIVATE), _malformed),
    Step("guest stores a secret in private memory",
         lambda a: a.store(SECRET, SECRET_VALUE), _store_secret,
         probe=lambda vmm: vmm.gmem.guest_read(vmm.offset_of(SECRET, 4), 4)),
    Step("guest reads its secret back",
         lambda a: a.load_and_report(SECRET), _load_secret),
    Step("guest takes the bounce buffer back (MapGPA private): revoked from every host mapping",
         lambda a: a.map_gpa(BOUNCE, BOUNCE_SIZE, g.OP_PRIVATE), _unshare,
         probe=lambda vmm: vmm.touch_in_child(BOUNCE)),
    Step("device DMA-reads the now private buffer it had mapped: SIGBUS in the device process",
         lambda a: a.doorbell(BOUNCE, BOUNCE_SIZE),
         lambda seen: check_device_sigbus(seen, BOUNCE, BOUNCE_SIZE)),
    Step("guest reads the now private bounce buffer",
         lambda a: a.load_and_report(BOUNCE), _load_bounce),
    Step("device is handed the private secret page: SIGBUS in the device process",
         lambda a: a.doorbell(SECRET, 0x1000),
         lambda seen: check_device_sigbus(seen, SECRET, 0x1000)),
    Step("guest discards 2 MiB (MapGPA discard -> punch hole)",
         lambda a: a.store(DISCARD, MARKER).map_gpa(DISCARD, DISCARD_SIZE, g.OP_DISCARD)
         .load_and_report(DISCARD), _discard),
    Step("guest shares its secret page; vCPU and device read it",
         lambda a: a.map_gpa(SECRET, 0x1000, g.OP_SHARED).load_and_report(SECRET).doorbell(SECRET, 0x1000),
         _share_secret),
]


# --- around the run: mount, huge pages, layout export ----------------------------------------------
def kvm_unavailable() -> str | None:
    """Why no VM can be run here, or None. (The kernel's own guest_memfd is not needed.)"""
    if platform.machine() != "x86_64":
        return f"the guest is x86-64 code and this is {platform.machine()}"
    try:
        with kvm.Kvm():
            return None
    except OSError as exc:
        return f"cannot use {kvm.KVM_DEVICE}: {exc}"


def kvm_flavour() -> str:
    for module, text in (("kvm_intel", "VMX"), ("kvm_amd", "SVM"),
                         ("kvm_pvm", "PVM: no hardware virtualization; KVM runs guest CPL 3 natively and "
                                     "emulates CPL 0 instruction by instruction")):
        if os.path.isdir(f"/sys/module/{module}"):
            return f"{module} ({text})"
    return "unknown"


class Termination:
    """SIGTERM and SIGINT end the VMM like an error (SystemExit 128 + the signal), so every cleanup on the
    stack runs -- except while something is half done (a mount starting, huge pages reserved but not yet on
    the cleanup stack) or while cleaning up: then the signal is remembered and acted on when that is over.

    A flag rather than a blocked signal mask, because the mask would be inherited by the processes
    started meanwhile (the ufsgmem server among them), which then could not be stopped with SIGTERM.
    """

    def __init__(self):
        self.depth = 0
        self.pending: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # started ignoring it (nohup, a shell's &): keep
                signal.signal(signum, self._handler)

    def _handler(self, signum, _frame) -> None:
        if self.depth:
            self.pending = signum
        else:
            raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def deferred(self):
        self.hold()
        try:
            yield
        finally:
            self.release()

    def hold(self) -> None:
        """From now on, only remember a signal; :meth:`release` acts on it."""
        self.depth += 1

    def release(self) -> None:
        self.depth -= 1
        if not self.depth and self.pending:
            raise SystemExit(128 + self.pending)


TERMINATION: Termination | None = None


def signals_deferred():
    """Hold SIGTERM/SIGINT back for the block (when main() has set them up)."""
    return TERMINATION.deferred() if TERMINATION else contextlib.nullcontext()


def use_mount(path: str | None, stack: contextlib.ExitStack) -> str:
    """The given mount, or a fresh one in a temporary directory, unmounted when ``stack`` unwinds."""
    if path:
        return path
    from ufsgmem.mounts import start_background, unmount
    from ufsgmem.fuse.server import logfile_path

    def remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)
        log = logfile_path(path)
        with contextlib.suppress(OSError):  # keep the server's log only when it has something to say
            with open(log, "rb") as f:
                text = f.read()
            if any(word in text for word in (b" ERROR ", b" CRITICAL ", b"Traceback")):
                say(f"vmm: the server logged errors: {log}")
            else:
                os.unlink(log)

    def umount(path: str) -> None:
        unmount(path, timeout=10)
        say(f"vmm: unmounted {path}")

    with signals_deferred():
        path = tempfile.mkdtemp(prefix="ufsgmem-vmm-")
        stack.callback(remove, path)
        start_background(path)
        stack.callback(umount, path)
    say(f"vmm: mounted ufsgmem on {path}")
    return path


def use_backing(choice: str, stack: contextlib.ExitStack) -> tuple[str, str | None, str]:
    """(backend, page_size, note) for the file. Huge pages are reserved until ``stack`` unwinds."""
    pages = RAM_SIZE // SZ_2M
    if choice == "anon":
        return "anon", None, "anonymous 4 KiB pages"
    reason = hugepages.unavailable_reason(SZ_2M)
    if reason is None:
        with signals_deferred():
            reservation = contextlib.ExitStack()
            got = reservation.enter_context(hugepages.reserved(SZ_2M, pages))
            if got == pages:
                reservation.callback(wait_until_free, pages)
                stack.enter_context(reservation)
                return "hugetlb", "2M", f"{pages} x 2 MiB pages reserved for the run, given back at the end"
            reservation.close()
        reason = f"the kernel gave {got} of {pages} 2 MiB pages"
    if choice == "hugetlb":
        raise VmmError(f"hugetlb backend unavailable: {reason}")
    return "anon", None, f"hugetlb unavailable ({reason}): anonymous 4 KiB pages"


def wait_until_free(pages: int, timeout: float = 5.0) -> None:
    """The server frees a destroyed file's pages once the kernel has sent the last RELEASE, which it does
    asynchronously: wait a moment, so the reserved pages go back to the pool free rather than as surplus."""
    deadline = time.monotonic() + timeout
    while hugepages.read(SZ_2M, "free_hugepages") < pages and time.monotonic() < deadline:
        time.sleep(0.05)


ROWS_SHOWN = 16


def export_layout(mount: str, name: str, out: str) -> tuple[bool, str]:
    """``ufsgmem layout MNT/NAME --view kvm`` as json and png; (ok, summary)."""
    lines, ok = [], True
    for exporter in ("json", "png"):
        target = os.path.join(out, f"layout-kvm.{exporter}")
        done = subprocess.run([sys.executable, "-m", "ufsgmem", "layout", os.path.join(mount, name), "--view",
                               "kvm", "--arch", "x86_64", "--memslot", f"{RAM_GPA:#x}", "--exporter", exporter,
                               "-o", target], capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not os.path.getsize(target):
            ok = False
            lines.append(f"{exporter}: failed: {(done.stderr or done.stdout).strip()}")
            continue
        lines.append(f"{exporter}: {target} ({os.path.getsize(target)} bytes)")
        if exporter == "json":
            with open(target) as f:
                layout = json.load(f)
            sizes = ", ".join(f"{n} x {int(s) >> 10} KiB" for s, n in sorted(layout["counts_by_size"].items(),
                                                                            key=lambda kv: -int(kv[0])))
            by_attr = ", ".join(f"{k} {v}" for k, v in sorted(layout.get("counts_by_attribute", {}).items()))
            lines.append(f"kvm view: {layout['leaves']} leaves ({sizes}); leaves by attribute: {by_attr}; "
                         f"{layout['mapped_bytes'] >> 10} KiB mapped")
            rows = layout["mappings"]
            for row in rows[:ROWS_SHOWN]:
                lines.append(f"  GPA {row['guest']:#09x} +{row['size'] >> 10:>5} KiB  {row['count']:>4} x "
                             f"{row['block'] >> 10:>4} KiB  {row['attribute']:<7} {row['perms']}")
            if len(rows) > ROWS_SHOWN:
                lines.append(f"  ... {len(rows) - ROWS_SHOWN} more rows in the file")
            ok = ok and layout["leaves"] > 0
    return ok, "\n".join(lines)


def report(number: str, title: str, ok: bool, detail: str) -> None:
    say(f"[{'ok' if ok else 'FAIL'}] {number:>3} {title}")
    for line in detail.splitlines():
        say(f"          {line}")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mount", help="an existing ufsgmem mount (default: mount a temporary one)")
    parser.add_argument("--name", default="vmm0", help="name of the guest_memfd file to create (default vmm0)")
    parser.add_argument("--backend", choices=("auto", "anon", "hugetlb"), default="auto",
                        help="auto: hugetlb 2 MiB pages when the pool can be grown, else anon")
    parser.add_argument("--cpl", type=int, choices=(0, 3), default=3,
                        help="the guest's privilege level (3: runs natively even under PVM)")
    parser.add_argument("--out", default="out/vmm", help="where the layout files go (default ./out/vmm)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds the guest may run")
    return parser.parse_args(argv)


def run_example(args, stack: contextlib.ExitStack) -> list[tuple[str, str, bool, str]]:
    """Set up, run the guest, check every step, export the layout, print the summary. Everything that
    must be undone goes on ``stack``. Returns (number, title, ok, detail) per check."""
    results = []
    mount_path = use_mount(args.mount, stack)
    backend, page_size, note = use_backing(args.backend, stack)
    mount = stack.enter_context(Mount(mount_path))
    with signals_deferred():
        gmem = mount.create(args.name, RAM_SIZE, "mmap", backend=backend, page_size=page_size)
        stack.callback(mount.destroy, args.name)
        stack.callback(gmem.close)
    status = gmem.status()
    with kvm.Kvm() as k:
        fault_info = k.check_extension(KVM_CAP_MEMORY_FAULT_INFO)
    say(f"vmm: KVM: {kvm_flavour()}; KVM_CAP_MEMORY_FAULT_INFO = {fault_info}")
    say(f"vmm: guest RAM {mount_path}/{args.name}/mem: {RAM_SIZE >> 20} MiB, flags mmap (private at "
        f"creation), backend {status['backend']} page size {status['page_size'] >> 10} KiB ({note})")
    say(f"vmm: guest runs at CPL {args.cpl}")

    vmm = Vmm(gmem, os.path.join(mount_path, args.name, "mem"), args.cpl, args.timeout)
    stack.callback(vmm.close)
    for number, (title, ok, detail) in enumerate(vmm.create_machine(), 1):
        results.append((f"S{number}", title, ok, detail))
    before, started = vmm.vcpu.stats(), time.monotonic()
    try:
        code = vmm.run()
        ran = (code == 0, f"the guest powered off with code {code} after step {vmm.step}")
    except (VmmError, OSError) as exc:
        ran = (False, f"{type(exc).__name__}: {exc}")
    elapsed, after = time.monotonic() - started, vmm.vcpu.stats()

    for number, step in enumerate(STEPS, 1):
        try:
            expect(number in vmm.seen, "the guest never finished this step")
            results.append((str(number), step.title, True, step.check(vmm.seen[number])))
        except Mismatch as exc:
            results.append((str(number), step.title, False, str(exc)))
        except Exception as exc:  # noqa: BLE001 -- a check that breaks is a failed check; the summary goes on
            results.append((str(number), step.title, False, f"cannot check: {type(exc).__name__}: {exc}"))
    delta = {k: after[k] - before.get(k, 0) for k in ("exits", "mmio_exits", "insn_emulation") if k in after}
    stats = ", ".join(f"{k} {v}" for k, v in delta.items()) or "no vCPU statistics on this kernel"
    results.append(("R", "guest ran to completion", ran[0], f"{ran[1]} ({elapsed:.2f} s; vCPU: {stats})"))

    vmm.close()  # the device, the VM and the VMM's mapping go before the layout is taken
    status = gmem.status()
    ok, text = export_layout(mount_path, args.name, args.out)
    results.append(("L", "stage-2 layout exported (ufsgmem layout --view kvm)", ok, text))

    say("")
    say("=== vmm summary ===")
    for number, title, ok, detail in results:
        report(number, title, ok, detail)
    counters = {k: status[k] for k in ("conversions", "revocations", "punches") if k in status}
    say(f"ufsgmem status: {json.dumps(counters)}")
    say(f"device processes: {' '.join(map(str, vmm.device.pids))}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = kvm_unavailable()
    if reason:
        say(f"vmm: cannot run: {reason}")
        return 2
    global TERMINATION
    TERMINATION = Termination()
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            results = run_example(args, stack)
        finally:
            TERMINATION.hold()  # the rest is cleanup: a signal now waits until it is done
    TERMINATION.release()
    passed = sum(ok for _n, _t, ok, _d in results)
    verdict = "every step behaved as expected" if passed == len(results) else "SOME STEPS DID NOT"
    say(f"=== {passed}/{len(results)} checks passed: {verdict} ===")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (VmmError, OSError) as exc:
        print(f"vmm: {exc}", file=sys.stderr)
        sys.exit(1)
