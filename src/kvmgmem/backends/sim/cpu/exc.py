"""Guest exception delivery through the 64-bit IDT, emulated in Python.

Unicorn never delivers x86 exceptions itself: with an interrupt hook it calls the hook and carries on, without
one it stops with ``UC_ERR_EXCEPTION``; in virtual-TLB mode a page fault is just our TLB-fill hook returning
False. So the CPU layer stops the engine at the faulting instruction and this module does what the
processor would (SDM vol. 3 §6.12-6.14): read the gate, check it, pick the stack (TSS.RSPn on a privilege
change, TSS.ISTn when the gate asks), push SS, RSP, RFLAGS, CS, RIP and the error code with supervisor
rights, load CS/SS hidden state, clear TF/NT/RF/VM (and IF for interrupt gates) and jump.

A fault while delivering is classified as the SDM's table 6-5 says: contributory-on-contributory or
page-fault-on-(page-fault|contributory) becomes #DF, anything during #DF is a triple fault, which the CPU
layer turns into ``ShutdownExit`` like KVM. Not modelled: LDT-based gate selectors, conforming-segment
subtleties, TSS limit checks (#TS), and error codes of exceptions unicorn raises itself (reported as 0).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from unicorn.x86_const import UC_X86_REG_CR2, UC_X86_REG_RFLAGS, UC_X86_REG_RIP, UC_X86_REG_RSP

from kvmgmem.backends.sim import exit_info
from kvmgmem.backends.sim.cpu.pagewalk import ACCESS_READ
from kvmgmem.backends.sim.cpu.uc import (
    DESC_DPL_SHIFT,
    OFF_HFLAGS,
    OFF_REGS,
    R_CS,
    R_SS,
    R_TR,
    CpuState,
    Engine,
    compute_hflags,
)
from kvmgmem.exits import Exit

VEC_DE, VEC_DB, VEC_NMI, VEC_BP, VEC_OF, VEC_BR, VEC_UD, VEC_NM = range(8)
VEC_DF, VEC_TS, VEC_NP, VEC_SS, VEC_GP, VEC_PF = 8, 10, 11, 12, 13, 14
VEC_AC = 17

HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})

GDT_INDEX = 8  # segment-cache slots after ES..GS, LDT, TR
IDT_INDEX = 9

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17


class GuestException(Exception):
    """An exception the guest must receive (raised by the Python-side emulation)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        super().__init__(vector, error_code, cr2)
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


class NeedRetry(Exception):
    """A guest-physical access hit an in-progress invalidation or a pending TLB flush: go back to the
    vCPU's safe point, service requests and redo the operation."""


class VmExitSignal(Exception):
    """A guest-physical access needs an exit to userspace (memory fault, emulation failure)."""

    def __init__(self, exit: Exit) -> None:
        super().__init__(exit)
        self.exit = exit


class MmioDuringAccess(VmExitSignal):
    """A Python-side guest access reached a gpa no memslot backs. Outside event delivery it is the emulation
    failure ``exit``; while delivering an event, :meth:`ExceptionDelivery.deliver` turns it into the
    delivery-error exit, which needs the exact ``gpa`` and the access's direction."""

    def __init__(self, exit: Exit, gpa: int, write: bool) -> None:
        super().__init__(exit)
        self.gpa = gpa
        self.write = write


class GuestMemory(Protocol):
    """Linear-address access with an explicit privilege level (implicit supervisor accesses pass 0)."""

    def read(self, va: int, n: int, access: int, cpl: int) -> bytes: ...

    def write(self, va: int, data: bytes, cpl: int) -> None: ...


@dataclass(frozen=True)
class Event:
    """An exception or software interrupt waiting to be delivered."""

    vector: int
    error_code: int | None = None
    cr2: int | None = None
    soft: bool = False  # INT n / INT3 / INTO: gate DPL is checked, RIP already points past the instruction


def _gp_idt(vector: int, soft: bool) -> GuestException:
    return GuestException(VEC_GP, vector * 8 + 2 + (0 if soft else 1))


class ExceptionDelivery:
    """Delivers ``Event``s for one vCPU; returns False on a triple fault."""

    def __init__(self, uc: Engine, state: CpuState, mem: GuestMemory) -> None:
        self._uc = uc
        self._state = state
        self._mem = mem

    def deliver(self, event: Event) -> bool:
        """Deliver ``event`` (and what delivering it raises); False on a triple fault. An access the delivery
        makes to MMIO (an IDT, GDT, TSS or stack with no memslot behind it) cannot be emulated while an event
        is being vectored: ``VmExitSignal`` with KVM_INTERNAL_ERROR_DELIVERY_EV (``vmx_check_emulate_instruction``
        returns X86EMUL_UNHANDLEABLE_VECTORING, then ``kvm_prepare_event_vectoring_exit``), carrying the EPT
        violation VMX would report for that access and the gpa."""
        current = event
        for _ in range(3):
            try:
                self._deliver_one(current)
                return True
            except MmioDuringAccess as mmio:
                qualification = exit_info.ept_violation_qualification(write=mmio.write)
                vectoring = exit_info.vectoring_info(current.vector, current.soft)
                raise VmExitSignal(
                    exit_info.delivery_event(exit_info.EXIT_REASON_EPT_VIOLATION, qualification, vectoring, mmio.gpa)
                ) from None
            except GuestException as nested:
                if current.vector == VEC_DF:
                    return False
                first_pf = current.vector == VEC_PF
                if (current.vector in CONTRIBUTORY and nested.vector in CONTRIBUTORY) or (
                    first_pf and (nested.vector in CONTRIBUTORY or nested.vector == VEC_PF)
                ):
                    current = Event(VEC_DF, 0)
                else:
                    current = Event(nested.vector, nested.error_code, nested.cr2)
        return False

    def _read_u64(self, va: int) -> int:
        return int.from_bytes(self._mem.read(va, 8, ACCESS_READ, 0), "little")

    def _deliver_one(self, ev: Event) -> None:
        uc = self._uc
        if ev.vector == VEC_PF and ev.cr2 is not None:
            uc.reg_write(UC_X86_REG_CR2, ev.cr2)  # CR2 is written when #PF is raised, even if delivery fails
        st = self._state.load()
        cpl = st.cpl
        _, idt_base, idt_limit, _ = st.segment(IDT_INDEX)
        _, gdt_base, gdt_limit, _ = st.segment(GDT_INDEX)
        if ev.vector * 16 + 15 > idt_limit:
            raise _gp_idt(ev.vector, ev.soft)
        lo, hi = struct.unpack("<QQ", self._mem.read(idt_base + ev.vector * 16, 16, ACCESS_READ, 0))
        gate_type = (lo >> 40) & 0xF
        gate_dpl = (lo >> 45) & 3
        if gate_type not in (0xE, 0xF):
            raise _gp_idt(ev.vector, ev.soft)
        if ev.soft and gate_dpl < cpl:
            raise _gp_idt(ev.vector, ev.soft)
        if not (lo >> 47) & 1:
            raise GuestException(VEC_NP, ev.vector * 8 + 2 + (0 if ev.soft else 1))
        target = (lo & 0xFFFF) | ((lo >> 48) << 16) | ((hi & 0xFFFFFFFF) << 32)
        selector = (lo >> 16) & 0xFFFF
        ist = (lo >> 32) & 7

        # the handler's code segment
        if selector & ~3 == 0 or selector & 4 or (selector | 7) > gdt_limit:
            raise GuestException(VEC_GP, selector & ~3)
        desc = self._read_u64(gdt_base + (selector & ~7))
        e2 = desc >> 32
        is_code = (e2 >> 12) & 1 and (e2 >> 11) & 1
        if not is_code or not (e2 >> 21) & 1 or (e2 >> 22) & 1:  # must be a 64-bit code segment
            raise GuestException(VEC_GP, selector & ~3)
        conforming = (e2 >> 10) & 1
        dpl = (e2 >> DESC_DPL_SHIFT) & 3
        new_cpl = cpl if conforming else dpl
        if dpl > cpl:
            raise GuestException(VEC_GP, selector & ~3)
        if not (e2 >> 15) & 1:
            raise GuestException(VEC_NP, selector & ~3)
        seg_limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
        if (e2 >> 23) & 1:
            seg_limit = (seg_limit << 12) | 0xFFF
        seg_base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)

        # the stack
        regs = uc.reg_read_batch([UC_X86_REG_RSP, UC_X86_REG_RFLAGS, UC_X86_REG_RIP])
        old_rsp, rflags, rip = regs[0], regs[1], regs[2]
        old_cs = st.segment(R_CS)[0]
        old_ss = st.segment(R_SS)[0]
        tss_base = st.segment(R_TR)[1]
        if ist:
            rsp = self._read_u64(tss_base + 0x24 + (ist - 1) * 8)
        elif new_cpl < cpl:
            rsp = self._read_u64(tss_base + 4 + new_cpl * 8)
        else:
            rsp = old_rsp
        rsp &= ~0xF
        frame = [rip, old_cs, rflags, old_rsp, old_ss]
        if ev.vector in HAS_ERROR_CODE and not ev.soft:
            frame.insert(0, ev.error_code or 0)
        new_rsp = (rsp - 8 * len(frame)) & 0xFFFFFFFFFFFFFFFF
        self._mem.write(new_rsp, struct.pack(f"<{len(frame)}Q", *frame), new_cpl)

        # commit
        new_flags = rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if gate_type == 0xE:
            new_flags &= ~RFLAGS_IF
        uc.reg_write(UC_X86_REG_RFLAGS, new_flags)
        st = self._state.load()
        st.set_segment(R_CS, (selector & ~3) | new_cpl, seg_base, seg_limit, e2)
        if new_cpl != cpl:
            st.set_segment(R_SS, new_cpl, 0, 0, new_cpl << DESC_DPL_SHIFT)
        st.set_u64(OFF_REGS + 4 * 8, new_rsp)
        st.set_u32(OFF_HFLAGS, compute_hflags(st))
        st.store()
        uc.reg_write(UC_X86_REG_RIP, target)


__all__ = [
    "Event",
    "ExceptionDelivery",
    "GuestException",
    "GuestMemory",
    "MmioDuringAccess",
    "NeedRetry",
    "VmExitSignal",
]
