"""A tiny long-mode guest kit for the CPU-layer tests (deliberately independent of kvmgmem.guest).

Guest-physical layout of the 4 MiB flat store (gpa == offset):

  0x01000 GDT   0x02000 IDT   0x03000 TSS   0x10000 PML4 / 0x11000 PDPT / 0x12000 PD / 0x13000 PT
  0x20000 code  0x40000 data  0x7F000 stack top (grows down)  0x9F000 IST1 stack top

Paging: VA 0-2 MiB via 4 KiB pages (PT at 0x13000), 2-4 MiB one 2 MiB page, 3 GiB-4 GiB one 1 GiB page
(identity; no memory behind it → MMIO). Every entry has U/S set so CPL3 code can run too.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable

import iced_x86 as ix

from kvmgmem import uapi
from kvmgmem.backends.sim.core.hypercall import emulate_hypercall
from kvmgmem.backends.sim.cpu import CpuSet, SimCpu
from kvmgmem.backends.sim.cpu.types import Mapped, MemoryFault, Mmio, Retry
from kvmgmem.exits import HypercallExit
from kvmgmem.hostmem import HostMemory

C = ix.Code
R = ix.Register
I = ix.Instruction  # noqa: E741

MEM_SIZE = 4 << 20
GDT, IDT, TSS = 0x1000, 0x2000, 0x3000
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
CODE, DATA, STACK_TOP, IST_TOP = 0x20000, 0x40000, 0x7F000, 0x9F000
MMIO_BASE = 0xC000_0000

P, RW, US, PS = 1, 2, 4, 0x80


def mem_op(displ: int = 0, base: int = R.NONE, size: int = 8) -> ix.MemoryOperand:
    if base == R.NONE:
        return ix.MemoryOperand(displ=displ, displ_size=8)
    return ix.MemoryOperand(base=base, displ=displ, displ_size=1 if -128 <= displ < 128 else 4)


class Asm:
    """Instructions with symbolic labels, encoded by iced's BlockEncoder at a chosen address."""

    def __init__(self) -> None:
        self._insns: list[ix.Instruction] = []
        self._labels: dict[str, int] = {}
        self._pending: list[int] = []
        self._next = 1 << 44

    def _label_ip(self, name: str) -> int:
        if name not in self._labels:
            self._labels[name] = self._next
            self._next += 1
        return self._labels[name]

    def label(self, name: str) -> Asm:
        self._pending.append(self._label_ip(name))
        return self

    def __call__(self, *insns: ix.Instruction) -> Asm:
        for insn in insns:
            if self._pending:
                if len(self._pending) > 1:  # several labels on one instruction: chain with a nop
                    for extra in self._pending[:-1]:
                        nop = I.create(C.NOPD)
                        nop.ip = extra
                        self._insns.append(nop)
                insn.ip = self._pending[-1]
                self._pending = []
            else:
                insn.ip = self._next
                self._next += 1
            self._insns.append(insn)
        return self

    def branch(self, code: int, name: str) -> Asm:
        return self(I.create_branch(code, self._label_ip(name)))

    def mov_imm(self, reg: int, value: int) -> Asm:
        return self(I.create_reg_u64(C.MOV_R64_IMM64, reg, value & ((1 << 64) - 1)))

    def out(self, port: int, reg: int = R.EAX) -> Asm:
        self(I.create_reg_u32(C.MOV_R32_IMM32, R.EDX, port))
        code = {R.AL: C.OUT_DX_AL, R.AX: C.OUT_DX_AX, R.EAX: C.OUT_DX_EAX}[reg]
        return self(I.create_reg_reg(code, R.DX, reg))

    def out_rax(self, port: int, value: int | None = None) -> Asm:
        if value is not None:
            self.mov_imm(R.RAX, value)
        return self.out(port)

    def hlt(self) -> Asm:
        return self(I.create(C.HLT))

    def raw(self, data: bytes) -> Asm:
        for b in data:
            self(I.create_declare_byte_1(b))
        return self

    def encode(self, ip: int) -> bytes:
        enc = ix.BlockEncoder(64)
        enc.add_many(self._insns)
        return bytes(enc.encode(ip))


def gdt_entries() -> list[int]:
    tss_lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | (((TSS >> 24) & 0xFF) << 56)
    return [
        0,
        0x00AF9B000000FFFF,  # 0x08 kernel code, L=1
        0x00CF93000000FFFF,  # 0x10 kernel data
        0x00AFFB000000FFFF,  # 0x18 user code, DPL3, L=1
        0x00CFF3000000FFFF,  # 0x20 user data, DPL3
        tss_lo,  # 0x28 TSS (available; the TR state below says busy, as KVM selftests do)
        TSS >> 32,
    ]


def idt_gate(handler: int, selector: int = 8, ist: int = 0, dpl: int = 0, gate_type: int = 0xE) -> bytes:
    lo = (handler & 0xFFFF) | (selector << 16) | (ist << 32) | (gate_type << 40) | (dpl << 45) | (1 << 47)
    lo |= ((handler >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", lo, handler >> 32)


class Guest:
    """A 4 MiB store with tables, plus a resolver over it."""

    def __init__(self) -> None:
        self.mem = HostMemory(MEM_SIZE)
        self.resolver = FakeResolver()
        for gfn in range(MEM_SIZE >> 12):
            self.resolver.map[gfn] = self.mem.address + (gfn << 12)
        self.cpuset = CpuSet(self.resolver)
        self.cpuset.add_store(self.mem.address, MEM_SIZE)
        self._write_tables()

    def write(self, gpa: int, data: bytes) -> None:
        self.mem[gpa : gpa + len(data)] = data

    def u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, gpa)[0])

    def set_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, gpa, value)

    def _write_tables(self) -> None:
        self.write(GDT, struct.pack("<7Q", *gdt_entries()))
        self.set_u64(TSS + 4, STACK_TOP)  # RSP0
        self.set_u64(TSS + 0x24, IST_TOP)  # IST1
        self.set_u64(PML4, PDPT | P | RW | US)
        self.set_u64(PDPT, PD | P | RW | US)
        self.set_u64(PDPT + 3 * 8, MMIO_BASE | P | RW | US | PS)  # 1 GiB page
        self.set_u64(PD, PT | P | RW | US)
        self.set_u64(PD + 8, (2 << 20) | P | RW | US | PS)  # 2 MiB page
        for i in range(512):
            self.set_u64(PT + 8 * i, (i << 12) | P | RW | US)

    def pte_addr(self, va: int) -> int:
        assert va < 2 << 20
        return PT + 8 * (va >> 12)

    def load(self, asm: Asm, at: int = CODE) -> int:
        code = asm.encode(at)
        self.write(at, code)
        return at

    def set_handler(self, vector: int, handler: int, ist: int = 0, dpl: int = 0) -> None:
        self.write(IDT + 16 * vector, idt_gate(handler, ist=ist, dpl=dpl))

    def cpu(self, rip: int = CODE, vcpu_id: int = 0, user: bool = False) -> SimCpu:
        cpu = self.cpuset.create_cpu(vcpu_id)
        cpu.set_sregs(long_mode_sregs(user))
        regs = uapi.kvm_regs()
        regs.rip = rip
        regs.rsp = STACK_TOP - 0x1000 if user else STACK_TOP
        regs.rflags = 2
        cpu.set_regs(regs)
        return cpu

    def close(self) -> None:
        self.cpuset.close()
        self.cpuset.remove_store(self.mem.address)
        self.mem.close()


def segment(selector: int, seg_type: int, dpl: int = 0, code: bool = False) -> uapi.kvm_segment:
    seg = uapi.kvm_segment()
    seg.selector = selector | dpl
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.type = seg_type
    seg.present = 1
    seg.dpl = dpl
    seg.s = 1
    seg.l = 1 if code else 0
    seg.db = 0 if code else 1
    seg.g = 1
    return seg


def long_mode_sregs(user: bool = False) -> uapi.kvm_sregs:
    """The boot state KVM selftests hand to KVM_SET_SREGS (optionally already at CPL3)."""
    s = uapi.kvm_sregs()
    s.cr0 = 0x80050033
    s.cr3 = PML4
    s.cr4 = 0x620
    s.efer = 0x500
    s.cs = segment(0x18 if user else 0x08, 11, 3 if user else 0, code=True)
    data = segment(0x20 if user else 0x10, 3, 3 if user else 0)
    s.ds = s.es = s.fs = s.gs = s.ss = data
    tr = uapi.kvm_segment()
    tr.selector, tr.base, tr.limit, tr.type, tr.present = 0x28, TSS, 0x67, 11, 1
    s.tr = tr
    ldt = uapi.kvm_segment()
    ldt.type, ldt.unusable = 2, 1
    s.ldt = ldt
    s.gdt.base, s.gdt.limit = GDT, 7 * 8 - 1
    s.idt.base, s.idt.limit = IDT, 0xFFF
    return s


class FakeResolver:
    """gfn → host page; gfns in ``faults`` give MemoryFault, ``retry_budget`` Retry; unmapped gfns are MMIO.

    Hypercalls are answered by the kernel model's rules (``core/hypercall.py``) with ``hypercall_exit_mask`` as
    KVM_CAP_EXIT_HYPERCALL's mask, or by ``hypercall_answer`` when set; each call is recorded in ``hypercalls``.
    """

    def __init__(self) -> None:
        self.map: dict[int, int] = {}
        self.readonly: set[int] = set()
        self.faults: dict[int, MemoryFault] = {}
        self.retry_budget = 0
        self.calls: list[tuple[int, bool, bool]] = []
        self.on_fault = None
        self.hypercall_exit_mask = 0
        self.hypercall_answer: int | HypercallExit | None = None
        self.hypercalls: list[tuple[int, ...]] = []

    def emulate_hypercall(self, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallExit:
        self.hypercalls.append((cpl, nr, a0, a1, a2, a3))
        if self.hypercall_answer is not None:
            return self.hypercall_answer
        answer = emulate_hypercall(self.hypercall_exit_mask, cpl, nr, a0, a1, a2, a3)
        if isinstance(answer, int):
            return answer
        return HypercallExit(answer.nr, (*answer.args, 0, 0, 0), answer.long_mode)

    def handle_fault(self, gpa: int, write: bool, fetch: bool) -> Mapped | MemoryFault | Mmio | Retry:
        self.calls.append((gpa, write, fetch))
        if self.on_fault is not None:
            self.on_fault(gpa, write, fetch)
        if self.retry_budget > 0:
            self.retry_budget -= 1
            return Retry()
        gfn = gpa >> 12
        if gfn in self.faults:
            return self.faults[gfn]
        host = self.map.get(gfn)
        if host is None or (write and gfn in self.readonly):
            return Mmio()
        return Mapped(host, 4096, gfn not in self.readonly)

    def fault_private(self, gfns: Iterable[int]) -> None:
        for gfn in gfns:
            self.faults[gfn] = MemoryFault(uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gfn << 12, 4096, errno.EFAULT)
