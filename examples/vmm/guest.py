"""The example's guest: its port I/O ABI, a tiny x86-64 assembler, its page tables and its CPU state.

The guest runs in 64-bit long mode with paging (identity-mapped by 2 MiB pages) so that it can reach all of
its RAM. It has no stack, no interrupts and no calls: each step of the scenario is a straight-line piece of
hand-assembled code, and the VMM (``vmm.py``) checks what each step did.

The ABI, all port I/O (``OUT``), modelled on a confidential guest's hypercalls (TDX ``MapGPA``, SEV-SNP
page state change) -- the arguments travel in registers, the result comes back in RAX:

==========  ===========================================================================================
port        meaning
==========  ===========================================================================================
0x80        POST code: AL = the number of the step that starts now (the classic PC debug port)
0xE0        MapGPA: AL = operation (0 shared, 1 private, 2 discard), RBX = guest physical address,
            RCX = size; RAX <- 0 or -errno (the errno of the VMM's KVM_SET_MEMORY_ATTRIBUTES2 or
            fallocate call)
0xE1        device doorbell: "DMA-read RBX..RBX+RCX"; RAX <- 0, or -EFAULT when the device could not
0xE2        report: EAX is a value the guest read, for the VMM to check
0xEF        power off: AL = exit code
==========  ===========================================================================================

Only a handful of encodings are needed, and the VMM decodes two of them (``mov eax,[rbx]`` and
``mov [rbx],eax``) when it has to complete a guest access to private memory itself (see vmm.py).
"""

from __future__ import annotations

import struct

PORT_POST = 0x80
PORT_MAPGPA = 0xE0
PORT_DOORBELL = 0xE1
PORT_REPORT = 0xE2
PORT_POWEROFF = 0xEF

OP_SHARED, OP_PRIVATE, OP_DISCARD = 0, 1, 2
OP_NAMES = {OP_SHARED: "shared", OP_PRIVATE: "private", OP_DISCARD: "discard"}

# --- guest physical memory map (guest physical address = offset in the ufsgmem file) --------------
BOOT_WINDOW = 0x10000  # [0, 64 KiB): code and page tables, made shared by the VMM before boot
CODE_GPA = 0x1000
PML4_GPA, PDPT_GPA, PD_GPA = 0x2000, 0x3000, 0x4000

# the two instructions the VMM may have to complete for the guest (opcode bytes, ModRM [rbx] with eax)
LOAD_EAX_RBX = b"\x8b\x03"  # mov eax, [rbx]   (zero-extends into rax)
STORE_EAX_RBX = b"\x89\x03"  # mov [rbx], eax
ACCESS_LENGTH = 2  # both are two bytes long


class Asm:
    """Appends x86-64 machine code for the few instructions the guest uses."""

    def __init__(self):
        self.code = bytearray()

    def _imm32(self, opcode: int, value: int) -> "Asm":
        self.code += bytes([opcode]) + struct.pack("<I", value & 0xFFFFFFFF)
        return self

    # mov r32, imm32 zero-extends into the 64-bit register, which is all the addresses here need
    def mov_eax(self, value: int) -> "Asm":
        return self._imm32(0xB8, value)

    def mov_ecx(self, value: int) -> "Asm":
        return self._imm32(0xB9, value)

    def mov_ebx(self, value: int) -> "Asm":
        return self._imm32(0xBB, value)

    def mov_edi(self, value: int) -> "Asm":
        return self._imm32(0xBF, value)

    def out_al(self, port: int) -> "Asm":
        self.code += bytes([0xE6, port])
        return self

    def out_eax(self, port: int) -> "Asm":
        self.code += bytes([0xE7, port])
        return self

    def rep_stosb(self) -> "Asm":  # memset(rdi, al, rcx)
        self.code += b"\xf3\xaa"
        return self

    def load_eax_rbx(self) -> "Asm":
        self.code += LOAD_EAX_RBX
        return self

    def store_eax_rbx(self) -> "Asm":
        self.code += STORE_EAX_RBX
        return self

    # --- the ABI, as macros ---------------------------------------------------------------------
    def post(self, step: int) -> "Asm":
        return self.mov_eax(step).out_al(PORT_POST)

    def map_gpa(self, gpa: int, size: int, op: int) -> "Asm":
        return self.mov_ebx(gpa).mov_ecx(size).mov_eax(op).out_al(PORT_MAPGPA)

    def doorbell(self, gpa: int, size: int) -> "Asm":
        return self.mov_ebx(gpa).mov_ecx(size).out_al(PORT_DOORBELL)

    def fill(self, gpa: int, size: int, byte: int) -> "Asm":
        return self.mov_edi(gpa).mov_ecx(size).mov_eax(byte).rep_stosb()

    def store(self, gpa: int, value: int) -> "Asm":
        return self.mov_ebx(gpa).mov_eax(value).store_eax_rbx()

    def load_and_report(self, gpa: int) -> "Asm":
        return self.mov_ebx(gpa).load_eax_rbx().out_eax(PORT_REPORT)

    def poweroff(self, code: int = 0) -> "Asm":
        return self.mov_eax(code).out_al(PORT_POWEROFF)


def page_tables(ram_size: int) -> dict[int, bytes]:
    """Identity map of ``[0, ram_size)`` with 2 MiB user-accessible pages: {guest physical: table page}."""
    present_rw_user = 0x7
    pml4 = struct.pack("<Q", PDPT_GPA | present_rw_user).ljust(4096, b"\0")
    pdpt = struct.pack("<Q", PD_GPA | present_rw_user).ljust(4096, b"\0")
    large = 0x80
    pd = b"".join(struct.pack("<Q", (i << 21) | present_rw_user | large)
                  for i in range((ram_size + (2 << 20) - 1) >> 21)).ljust(4096, b"\0")
    return {PML4_GPA: pml4, PDPT_GPA: pdpt, PD_GPA: pd}


# --- CPU state: 64-bit mode, paging on, at CPL 3 or 0 ------------------------------------------------
CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_RESERVED, RFLAGS_IOPL3 = 1 << 1, 3 << 12

#: struct kvm_segment: base u64, limit u32, selector u16, type, present, dpl, db, s, l, g, avl, unusable, pad
KVM_SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
SREGS_CR0, SREGS_CR3, SREGS_CR4, SREGS_EFER = 224, 240, 248, 264  # offsets in struct kvm_sregs


def long_mode_sregs(sregs: bytearray, cpl: int) -> None:
    """Edit a ``struct kvm_sregs`` (from KVM_GET_SREGS) for flat 64-bit code at privilege level ``cpl``.

    No GDT is needed: KVM loads the segment registers' hidden state from this struct, and the guest never
    reloads a segment.
    """
    code_sel, data_sel = (0x33, 0x2B) if cpl == 3 else (0x08, 0x10)
    KVM_SEGMENT.pack_into(sregs, 0, 0, 0xFFFFFFFF, code_sel, 0xB, 1, cpl, 0, 1, 1, 1, 0, 0)  # cs, L=1
    for index in range(1, 6):  # ds, es, fs, gs, ss
        KVM_SEGMENT.pack_into(sregs, 24 * index, 0, 0xFFFFFFFF, data_sel, 0x3, 1, cpl, 1, 1, 0, 1, 0, 0)
    struct.pack_into("<Q", sregs, SREGS_CR0, CR0_PE | CR0_ET | CR0_PG)
    struct.pack_into("<Q", sregs, SREGS_CR3, PML4_GPA)
    struct.pack_into("<Q", sregs, SREGS_CR4, CR4_PAE)
    struct.pack_into("<Q", sregs, SREGS_EFER, EFER_LME | EFER_LMA)


def initial_rflags(cpl: int) -> int:
    """IOPL 3 lets CPL-3 code use OUT (the ABI); interrupts stay off."""
    return RFLAGS_RESERVED | (RFLAGS_IOPL3 if cpl == 3 else 0)
