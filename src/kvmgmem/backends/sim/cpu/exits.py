"""What the vCPU makes of an engine stop: exits to userspace, events to inject, and their completions.

Why one place: every stop of ``emu_start`` is decided here from what the hooks recorded — an IN/OUT, an
interrupt, an invalid opcode, a TLB fill that installed nothing (``outcome.TlbEvent``) — the way KVM's exit
handlers turn a VM exit into a KVM_EXIT_* for userspace (``complete_userspace_io`` then finishes the
instruction on the next KVM_RUN), into an exception to inject, or into a hypercall KVM answers itself
(``kvm_emulate_hypercall``: the resolver's answer, ``types.GpaResolver.emulate_hypercall``; the CPU only applies it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import iced_x86 as ix
from unicorn.x86_const import (
    UC_X86_REG_RAX,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDX,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
)

from kvmgmem import uapi
from kvmgmem.backends.sim.cpu.emul import UC_GPR, MmioAccess, decode, decode_mmio, memory_operands
from kvmgmem.backends.sim.cpu.exc import VEC_GP, VEC_PF, VEC_UD, Event, GuestException, NeedRetry, VmExitSignal
from kvmgmem.backends.sim.cpu.memory import MASK64, PAGE_MASK, GuestMemoryAccess
from kvmgmem.backends.sim.cpu.outcome import KVM_INTERNAL_ERROR_EMULATION, DataOutcome, FillOutcome
from kvmgmem.backends.sim.cpu.pagewalk import ACCESS_FETCH, ACCESS_WRITE, NonCanonical, PageFault
from kvmgmem.backends.sim.cpu.sites import CodeSites
from kvmgmem.backends.sim.cpu.types import PAGE_SIZE, MemoryFault, Mmio, Retry, fault_exit
from kvmgmem.backends.sim.cpu.uc import CpuState, Engine
from kvmgmem.exits import Exit, HypercallExit, InternalErrorExit, IoExit, MmioExit, Pending

if TYPE_CHECKING:
    from kvmgmem.backends.sim.cpu.cpuset import CpuSet

HYPERCALL_INSNS = (b"\x0f\x01\xc1", b"\x0f\x01\xd9")  # VMCALL, VMMCALL


@dataclass
class IoEvent:
    """An IN/OUT the port hooks saw during one ``emu_start``."""

    direction: int
    port: int
    size: int
    data: bytes
    rip: int
    rax: int = 0


@dataclass
class Completion:
    """What the next ``run()`` finishes before entering the guest (KVM's ``complete_userspace_io``)."""

    kind: Pending | None  # the reply the exit waits for (the base Vcpu's vocabulary); None: only skip it
    next_rip: int
    size: int = 0
    mmio: MmioAccess | None = None
    data: bytes = b""
    ret: int = 0


class ExitHandler:
    """Records what stopped the engine (the instruction hooks) and turns it into an exit or an event."""

    def __init__(self, uc: Engine, state: CpuState, sites: CodeSites, memory: GuestMemoryAccess, cpuset: CpuSet):
        self._uc = uc
        self._state = state
        self._sites = sites
        self._memory = memory
        self._cpuset = cpuset
        # events recorded by hooks during one emu_start
        self.io: IoEvent | None = None
        self.intr: tuple[int, int] | None = None  # (vector, rip)
        self.invalid_insn = False
        # cross-run state
        self.completion: Completion | None = None
        self.pending_event: Event | None = None

    def clear_events(self) -> None:
        self.io = self.intr = None
        self.invalid_insn = False

    # --- hooks (vCPU thread, inside emu_start) -------------------------------------------------------------

    def hook_out(self, uc: Engine, port: int, size: int, value: int, _ud: object) -> None:
        if self.io is None:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.io = IoEvent(uapi.KVM_EXIT_IO_OUT, port, size, data, uc.reg_read(UC_X86_REG_RIP))
        uc.emu_stop()

    def hook_in(self, uc: Engine, port: int, size: int, _ud: object) -> int:
        if self.io is None:
            rip, rax = uc.reg_read_batch([UC_X86_REG_RIP, UC_X86_REG_RAX])
            self.io = IoEvent(uapi.KVM_EXIT_IO_IN, port, size, bytes(size), rip, rax)
        uc.emu_stop()
        return 0

    def hook_intr(self, uc: Engine, intno: int, _ud: object) -> None:
        if self.intr is None:
            self.intr = (intno, uc.reg_read(UC_X86_REG_RIP))
        uc.emu_stop()

    def hook_insn_invalid(self, uc: Engine, _ud: object) -> bool:
        self.invalid_insn = True
        return False  # ends emu_start with UC_ERR_INSN_INVALID, RIP at the instruction

    # --- completions (KVM_RUN's next entry) ----------------------------------------------------------------

    def complete_io(self, data: bytes) -> None:
        c = self.completion
        if c is not None and c.kind == Pending.IO_IN:
            c.data = bytes(data)

    def complete_mmio(self, data: bytes) -> None:
        c = self.completion
        if c is not None and c.kind == Pending.MMIO_READ:
            c.data = bytes(data)

    def complete_hypercall(self, ret: int) -> None:
        c = self.completion
        if c is not None and c.kind == Pending.HYPERCALL:
            c.ret = ret & MASK64

    def finish_completion(self) -> None:
        """Apply the answer to the last exit and step over its instruction (``complete_userspace_io``)."""
        c, self.completion = self.completion, None
        if c is None:
            return
        uc = self._uc
        if c.kind == Pending.IO_IN:
            rax = uc.reg_read(UC_X86_REG_RAX)
            value = int.from_bytes(c.data[: c.size].ljust(c.size, b"\0"), "little")
            if c.size == 4:
                rax = value
            else:
                mask = (1 << (8 * c.size)) - 1
                rax = (rax & ~mask) | value
            uc.reg_write(UC_X86_REG_RAX, rax & MASK64)
        elif c.kind == Pending.MMIO_READ and c.mmio is not None:
            reg_id = UC_GPR[ix.RegisterExt.full_register(c.mmio.dest)]
            uc.reg_write(reg_id, c.mmio.load_result(uc.reg_read(reg_id), c.data))
        elif c.kind == Pending.HYPERCALL:
            uc.reg_write(UC_X86_REG_RAX, c.ret)
        uc.reg_write(UC_X86_REG_RIP, c.next_rip)

    # --- exits ---------------------------------------------------------------------------------------------

    def io_exit(self, io: IoEvent) -> Exit:
        uc = self._uc
        next_rip = uc.reg_read(UC_X86_REG_RIP)
        if next_rip != io.rip and not self._sites.is_after_io(next_rip):
            # the stop did not land on a hooked address, so code after the IN/OUT ran (only possible for
            # code unicorn translated before it was scanned, e.g. code the guest rewrote): refuse loudly
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (io.rip, next_rip))
        if io.direction == uapi.KVM_EXIT_IO_IN:
            if self._sites.is_ins(io.rip):  # INS: the dummy value already went to memory; not emulated
                return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (io.rip,))
            uc.reg_write(UC_X86_REG_RAX, io.rax)
            self.completion = Completion(Pending.IO_IN, next_rip, size=io.size)
        else:
            self.completion = Completion(None, next_rip)
        uc.reg_write(UC_X86_REG_RIP, io.rip)  # as KVM: RIP stays on the instruction until the next run
        return IoExit(io.direction, io.port, io.size, 1, io.data)

    def tlb_exit(self, vaddr: int, acc: int, outcome: FillOutcome) -> Exit | None:
        """A fill that installed nothing: inject #PF/#GP, exit, or retry (None: re-enter the guest)."""
        if isinstance(outcome, PageFault):
            self.pending_event = Event(VEC_PF, outcome.error_code, self._fault_address(vaddr, acc))
            return None
        if isinstance(outcome, NonCanonical):
            self.pending_event = Event(VEC_GP, 0)
            return None
        if isinstance(outcome, VmExitSignal):
            return outcome.exit
        if isinstance(outcome, DataOutcome):
            gpa_page, res = outcome.gpa_page, outcome.result
            if isinstance(res, Mmio):
                return self._mmio_exit(vaddr, gpa_page, acc)
            if isinstance(res, Retry):
                time.sleep(0)
                return None
            if isinstance(res, MemoryFault):
                return fault_exit(res)
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (gpa_page,))
        if isinstance(outcome, Retry):
            time.sleep(0)
            return None
        if isinstance(outcome, MemoryFault):  # taken while walking the guest's page tables
            return fault_exit(outcome)
        return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (vaddr,))  # e.g. a page table in MMIO space

    def _fault_address(self, page: int, acc: int) -> int:
        """CR2: the exact linear address, from the decoded instruction (unicorn only tells us the page)."""
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        if acc == ACCESS_FETCH:
            return rip if rip & PAGE_MASK == page else page
        try:
            insn = decode(self._memory.fetch_insn(rip), rip)
        except (GuestException, NeedRetry, VmExitSignal):
            return page
        if insn is None:
            return page
        for addr, size, write in memory_operands(insn, self._uc.reg_read):
            if acc == ACCESS_WRITE and not write:
                continue
            if addr & PAGE_MASK == page:
                return addr
            if addr < page < addr + size:
                return page
        return page

    def _mmio_exit(self, page: int, gpa_page: int, acc: int) -> Exit:
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        if acc == ACCESS_FETCH:
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (rip,))
        insn = decode(self._memory.fetch_insn(rip), rip)
        access = decode_mmio(insn, self._uc.reg_read) if insn is not None else None
        if access is None or access.va & PAGE_MASK != page or (access.va & 0xFFF) + access.length > PAGE_SIZE:
            return InternalErrorExit(KVM_INTERNAL_ERROR_EMULATION, (rip,))
        gpa = gpa_page | (access.va & 0xFFF)
        if access.is_write:
            self.completion = Completion(None, access.next_rip)
            return MmioExit(gpa, access.data, access.length, True)
        self.completion = Completion(Pending.MMIO_READ, access.next_rip, mmio=access)
        return MmioExit(gpa, bytes(access.length), access.length, False)

    def invalid_opcode(self) -> Exit | None:
        """#UD, unless the instruction is a hypercall (VMCALL/VMMCALL reach the invalid-instruction hook)."""
        rip = self._uc.reg_read(UC_X86_REG_RIP)
        code = self._memory.fetch_insn(rip)
        if code[:3] not in HYPERCALL_INSNS:
            self.pending_event = Event(VEC_UD)
            return None
        return self._hypercall(rip)

    def _hypercall(self, rip: int) -> Exit | None:
        """A VMCALL/VMMCALL at ``rip``: the resolver answers it (``kvm_emulate_hypercall`` is the kernel model's,
        ``GpaResolver.emulate_hypercall``); the CPU only applies the answer. A return value goes to RAX and RIP
        steps over the instruction; an exit leaves RIP on it until ``complete_hypercall``'s answer is applied."""
        uc = self._uc
        regs = uc.reg_read_batch([UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RSI])
        answer = self._cpuset.resolver.emulate_hypercall(self._state.load().cpl, *regs)
        if isinstance(answer, HypercallExit):
            self.completion = Completion(Pending.HYPERCALL, rip + 3)
            return answer
        uc.reg_write(UC_X86_REG_RAX, answer & MASK64)
        uc.reg_write(UC_X86_REG_RIP, rip + 3)
        return None
