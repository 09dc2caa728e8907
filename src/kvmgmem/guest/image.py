"""A bootable long-mode guest image: GDT, IDT, TSSes, kernel + payload code, stacks, identity page tables.

The image is plain bytes at known gpas (``segments``), so it can be written through any buffer that backs
guest memory — a ``HostMemory`` memslot or a guest_memfd mapping — and the same bytes run on real KVM and on
the sim. ``setup_vcpu`` is the one call that puts a vCPU into the image's long-mode state.

Memory map (from ``base``, page aligned pieces)::

    GDT | IDT | TSS[nvcpus] | I/O bitmap | code (payload, kernel, rodata)
        | data[nvcpus] | (kstack, stack)[nvcpus] | page tables

Payload entry ABI: rdi = vCPU index, rsi = that vCPU's data area, rdx/rcx/r8/r9 = up to four arguments,
rsp = the top of its own stack. With ``user=True`` the payload runs at CPL3 (user pages, DPL3 segments,
IOPL=3) and faults still reach the CPL0 IDT, which reports them through an EXCEPTION ucall.

Private alias (``private_alias=N``, for the sim's ``private_access_bit=N``): the identity-mapped range is
mapped a second time at ``PRIVATE_ALIAS_BASE + pa`` with bit N set in every leaf PTE, as an SEV guest maps
memory with the C-bit. The guest touches a gpa *privately* through ``image.private_va(gpa)`` and *shared*
through its identity address; on a backend honouring the bit, a mismatch with the page's attribute is a
KVM_EXIT_MEMORY_FAULT the VMM answers by converting (an implicit conversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvmgmem import uapi
from kvmgmem.api import Vcpu
from kvmgmem.guest import descriptors as D
from kvmgmem.guest import paging
from kvmgmem.guest.asm import Asm, LabelRef, Program
from kvmgmem.guest.kernel import emit_kernel
from kvmgmem.guest.memory import GuestMemory
from kvmgmem.guest.operands import Label

PAGE = uapi.PAGE_SIZE
MAX_PAYLOAD_ARGS = 4  # a payload entry's arguments, in rdx, rcx, r8, r9 (a ucall's limit is ucall.MAX_ARGS)
#: VA of the private alias of gpa 0: PML4 slot 128 (64 TiB), far above any identity reach in use.
PRIVATE_ALIAS_BASE = 0x4000_0000_0000


def _up(x: int, align: int = PAGE) -> int:
    return (x + align - 1) // align * align


@dataclass(frozen=True)
class VcpuArea:
    """Where one vCPU's private memory is: data area, kernel stack (for faults at CPL3), payload stack."""

    index: int
    data: int
    data_size: int
    kstack_top: int
    stack_top: int
    tss: int
    tss_limit: int


class GuestImage:
    """Build an image around ``payload`` (an ``Asm`` whose first instruction is the default entry)."""

    def __init__(
        self,
        payload: Asm,
        *,
        nvcpus: int = 1,
        user: bool = False,
        base: int = 0x10000,
        reach: int = 512 * paging.GiB,
        page_size: int = paging.PAGE_2M,
        stack_size: int = 64 * 1024,
        kstack_size: int = 16 * 1024,
        data_size: int = PAGE,
        private_alias: int | None = None,
        private_alias_base: int = PRIVATE_ALIAS_BASE,
    ) -> None:
        if not 1 <= nvcpus <= (PAGE - D.TSS_FIRST) // 16:
            raise ValueError(f"nvcpus must be 1..{(PAGE - D.TSS_FIRST) // 16}")
        if base % PAGE:
            raise ValueError("image base must be page aligned")
        if private_alias is not None and (isinstance(private_alias, bool) or not 12 <= private_alias <= 62):
            raise ValueError(f"private_alias must be a PTE bit 12..62, not {private_alias!r}")
        self.nvcpus, self.user, self.base = nvcpus, user, base
        self.private_alias = private_alias
        self.private_alias_base = private_alias_base if private_alias is not None else None
        self.gdt = base
        self.idt = base + PAGE
        self.tss_base = base + 2 * PAGE
        self.io_bitmap = self.tss_base + _up(nvcpus * D.TSS_STRIDE)  # shared by every vCPU's TSS
        self.code = self.io_bitmap + _up(D.IO_BITMAP_SIZE)

        self.entry = Label("main")
        whole = Asm().label(self.entry).include(payload)
        self.kernel = emit_kernel(whole)
        self.program: Program = whole.assemble(self.code)

        cursor = _up(self.program.end)
        data = cursor
        cursor += nvcpus * _up(data_size)
        self.areas: list[VcpuArea] = []
        for i in range(nvcpus):
            kstack_top = cursor + kstack_size
            stack_top = kstack_top + stack_size
            cursor = stack_top
            tss = self.tss_base + i * D.TSS_STRIDE
            limit = self.io_bitmap - tss + D.IO_BITMAP_SIZE - 1
            self.areas.append(VcpuArea(i, data + i * _up(data_size), data_size, kstack_top, stack_top, tss, limit))
        if private_alias is None:
            self.tables = paging.build(_up(cursor), reach, page_size, user=user)
        else:
            self.tables = paging.build(
                _up(cursor), reach, page_size, user=user, alias_base=private_alias_base, alias_bits=1 << private_alias
            )
        self.end = self.tables.base + self.tables.size
        if self.end > reach:
            raise ValueError(f"the image ends at {self.end:#x}, beyond the mapped reach {reach:#x}")
        if self.end > 1 << 32:
            raise ValueError("the image must lie below 4 GiB (ucall structs live on its stacks)")

    # --- contents ----------------------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, bytes]]:
        """(gpa, bytes) pieces to write; everything else in [base, end) is expected to read as zero."""
        handlers = {v: self.program.address(stub) for v, stub in enumerate(self.kernel.stubs)}
        tss = b"".join(D.tss(a.kstack_top, self.io_bitmap - a.tss).ljust(D.TSS_STRIDE, b"\0") for a in self.areas)
        return [
            (self.gdt, D.gdt([(a.tss, a.tss_limit) for a in self.areas])),
            (self.idt, D.idt(handlers)),
            (self.tss_base, tss),
            (self.io_bitmap, D.io_bitmap()),
            (self.code, self.program.code),
            (self.tables.base, self.tables.data),
        ]

    def load(self, buffer: Any, gpa: int = 0) -> None:
        """Write the image into ``buffer``, which backs guest-physical [gpa, gpa + len(buffer))."""
        memory = GuestMemory().add(gpa, buffer)
        try:
            self.load_into(memory)
        finally:
            memory.release()

    def load_into(self, memory: GuestMemory) -> None:
        for where, blob in self.segments():
            memory.write(where, blob)

    # --- addresses ---------------------------------------------------------------------------------------

    def address(self, label: LabelRef) -> int:
        """Final gpa (== gva) of a payload label."""
        return self.program.address(label)

    def private_va(self, gpa: int) -> int:
        """The VA at which the guest accesses ``gpa`` privately (through the C-bit alias)."""
        if self.private_alias_base is None:
            raise ValueError("this image has no private alias (build it with private_alias=N)")
        if not 0 <= gpa < self.tables.reach:
            raise ValueError(f"gpa {gpa:#x} is outside the mapped reach {self.tables.reach:#x}")
        return self.private_alias_base + gpa

    def area(self, index: int) -> VcpuArea:
        return self.areas[index]

    def disassemble(self) -> str:
        return self.program.disassemble()

    # --- vCPU state --------------------------------------------------------------------------------------

    def setup_vcpu(
        self,
        vcpu: Vcpu,
        index: int = 0,
        *,
        entry: LabelRef | int | None = None,
        args: Sequence[int] = (),
        cpuid: bool = True,
    ) -> None:
        """Put ``vcpu`` into long mode at the payload entry (or ``entry``): sregs, regs and (by default) the
        system's supported CPUID, as VMMs do before the first KVM_RUN."""
        if not 0 <= index < self.nvcpus:
            raise ValueError(f"vCPU index {index} outside this image's {self.nvcpus} vCPUs")
        if len(args) > MAX_PAYLOAD_ARGS:
            raise ValueError(f"at most {MAX_PAYLOAD_ARGS} payload arguments")
        area = self.areas[index]
        if cpuid:
            vcpu.set_cpuid()
        sregs = vcpu.get_sregs()
        D.apply_long_mode(
            sregs,
            cr3=self.tables.cr3,
            gdt_base=self.gdt,
            gdt_limit=D.TSS_FIRST + 16 * self.nvcpus - 1,
            idt_base=self.idt,
            tss_base=area.tss,
            tss_limit=area.tss_limit,
            tr=D.tss_selector(index),
        )
        vcpu.set_sregs(sregs)
        start = self._resolve(entry)
        regs = uapi.kvm_regs()
        regs.rflags = 0x2
        regs.rdi, regs.rsi = index, area.data
        for name, value in zip(("rdx", "rcx", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & (1 << 64) - 1)
        if self.user:
            regs.rip, regs.rsp = self.program.address(self.kernel.user_entry), area.kstack_top
            regs.r12, regs.r13 = start, area.stack_top
        else:
            regs.rip, regs.rsp = start, area.stack_top
        vcpu.set_regs(regs)

    def _resolve(self, entry: LabelRef | int | None) -> int:
        if entry is None:
            return self.program.address(self.entry)
        if isinstance(entry, int):
            return entry
        return self.program.address(entry)
