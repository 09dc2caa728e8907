"""One vCPU's kernel state (``struct kvm_vcpu`` and ``vcpu->arch``) and the rules of its x86 ioctls.

Why in the core: the adapter (``backends/sim/vcpu.py``) owns the fd and the execution engine, but which CPUID table
KVM_SET_CPUID2 accepts, which mp_state KVM_SET_MP_STATE takes, when KVM_RUN fails with EINTR, blocks or cannot
follow the guest are the kernel's decisions: state and checks here, testable with plain objects. Registers stay
with the engine; where a rule changes them (a SIPI) this module says how and the adapter writes them. Callers hold
the vCPU mutex (``vcpu_load``) around every method, as the kernel's vCPU ioctls do.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from ..fault import FaultResult, MemoryFault, Mmio, Retry
from .cpuid_tables import check_cpuid, cpuid_equal

#: mp_states only a vCPU with an in-kernel local APIC may be put in (``kvm_arch_vcpu_ioctl_set_mpstate``).
NEEDS_LAPIC = (
    uapi.KVM_MP_STATE_UNINITIALIZED,
    uapi.KVM_MP_STATE_HALTED,
    uapi.KVM_MP_STATE_AP_RESET_HOLD,
    uapi.KVM_MP_STATE_INIT_RECEIVED,
    uapi.KVM_MP_STATE_SIPI_RECEIVED,
)
_X86_CR0_PE = 1


def reset_regs() -> uapi.kvm_regs:
    """The GPRs after RESET (``kvm_vcpu_reset``): what KVM_GET_REGS shows on a fresh vCPU."""
    regs = uapi.kvm_regs()
    regs.rip = 0xFFF0
    regs.rflags = 0x2
    return regs


def reset_sregs() -> uapi.kvm_sregs:
    """The segments and control registers after RESET (``kvm_vcpu_reset``, ``vmx_vcpu_reset``): real mode, CS base
    0xffff0000 so the first fetch is at 0xfffffff0."""
    s = uapi.kvm_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        seg.limit, seg.present, seg.s, seg.type = 0xFFFF, 1, 1, 0x3
    s.cs.selector, s.cs.base, s.cs.type = 0xF000, 0xFFFF0000, 0xB
    s.tr.limit, s.tr.present, s.tr.type = 0xFFFF, 1, 0xB
    s.ldt.limit, s.ldt.present, s.ldt.type = 0xFFFF, 1, 0x2
    s.gdt.limit = s.idt.limit = 0xFFFF
    s.cr0 = 0x60000010
    s.apic_base = 0xFEE00900
    return s


class VcpuCore:
    """The kernel side of one vCPU: has it run, its CPUID table, its mp_state and pending SIPI."""

    def __init__(self, vcpu_id: int, lapic: bool) -> None:
        """``kvm_arch_vcpu_create``: ``lapic`` is whether the VM had an in-kernel irqchip then (the local APIC comes
        with it); with one, only the BSP (vCPU 0, ``kvm_vcpu_is_reset_bsp``) starts RUNNABLE and the APs wait for
        INIT/SIPI, which nothing in the sim sends."""
        self.vcpu_id = vcpu_id
        self.lapic = lapic
        runnable = not lapic or vcpu_id == 0
        self.mp_state = uapi.KVM_MP_STATE_RUNNABLE if runnable else uapi.KVM_MP_STATE_UNINITIALIZED
        #: Entered the guest once (``kvm_vcpu_has_run``: last_vmentry_cpu != -1): the CPUID table is frozen.
        self.has_run = False
        #: KVM_APIC_SIPI in apic->pending_events (its vector is 0: no SIPI message is modelled).
        self.sipi_pending = False
        #: vcpu->arch.cpuid_entries as userspace set them (without the bits KVM refreshes at runtime).
        self.cpuid: list[uapi.kvm_cpuid_entry2] = []

    # --- KVM_SET_CPUID2 / KVM_GET_CPUID2 -------------------------------------------------------------------------

    def set_cpuid2(
        self, table: Any, current: Callable[[], Sequence[uapi.kvm_cpuid_entry2]]
    ) -> list[uapi.kvm_cpuid_entry2] | None:
        """``kvm_vcpu_ioctl_set_cpuid2`` with ``table`` (a ``uapi.cpuid2_type``), then ``kvm_set_cpuid``.

        E2BIG past KVM_MAX_CPUID_ENTRIES (256) before the entries are copied; once the vCPU has run only the
        table it has is accepted (``kvm_cpuid_check_equal`` against ``current()``, the table with the KVM-owned
        bits refreshed, as ``kvm_update_cpuid_runtime`` does first), EINVAL otherwise; EINVAL for a table
        ``kvm_check_cpuid`` refuses. Returns the new table for the engine, or None when nothing changes (the
        same table set again after the vCPU ran).
        """
        op = "KVM_SET_CPUID2"
        if table.nent > uapi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(errno.E2BIG, op, f"{table.nent} entries > KVM_MAX_CPUID_ENTRIES (256)")
        entries = [uapi.kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]
        if self.has_run:
            if not cpuid_equal(entries, current()):
                raise KvmError(errno.EINVAL, op, "the vCPU has run: only the same CPUID table may be set again")
            return None
        why = check_cpuid(entries)
        if why is not None:
            raise KvmError(errno.EINVAL, op, why)
        self.cpuid = entries
        return entries

    def get_cpuid2(self, nent: int) -> None:
        """``kvm_vcpu_ioctl_get_cpuid2``'s check: a buffer of ``nent`` entries smaller than the table is E2BIG
        (and ``nent`` is not written back); the caller then copies the table out."""
        if nent < len(self.cpuid):
            raise KvmError(errno.E2BIG, "KVM_GET_CPUID2", f"{len(self.cpuid)} entries, room for {nent}")

    # --- KVM_GET_MP_STATE / KVM_SET_MP_STATE ---------------------------------------------------------------------

    def accept_events(self) -> int | None:
        """``kvm_apic_accept_events``: a pending SIPI starts a vCPU waiting in INIT_RECEIVED (RUNNABLE from now).

        Returns the SIPI vector whose entry the caller loads into the registers (``kvm_vcpu_deliver_sipi_vector``:
        CS selector ``vector << 8``, base ``vector << 12``, RIP 0), or None when nothing is delivered.
        """
        if not self.sipi_pending:
            return None
        self.sipi_pending = False
        if self.mp_state != uapi.KVM_MP_STATE_INIT_RECEIVED:
            return None
        self.mp_state = uapi.KVM_MP_STATE_RUNNABLE
        return 0

    def set_mp_state(self, value: int) -> None:
        """``kvm_arch_vcpu_ioctl_set_mpstate``: every state but RUNNABLE needs an in-kernel local APIC (EINVAL);
        an unknown state is EINVAL; the obsolete SIPI_RECEIVED is INIT_RECEIVED with the SIPI pending."""
        op = "KVM_SET_MP_STATE"
        if value in NEEDS_LAPIC and not self.lapic:
            raise KvmError(errno.EINVAL, op, f"mp_state {value} needs an in-kernel local APIC")
        if value != uapi.KVM_MP_STATE_RUNNABLE and value not in NEEDS_LAPIC:
            raise KvmError(errno.EINVAL, op, f"unknown mp_state {value}")
        if value == uapi.KVM_MP_STATE_SIPI_RECEIVED:
            value = uapi.KVM_MP_STATE_INIT_RECEIVED
            self.sipi_pending = True
        self.mp_state = value

    # --- KVM_RUN (kvm_arch_vcpu_ioctl_run) ------------------------------------------------------------------------

    def run_entry(self, immediate_exit: bool) -> None:
        """KVM_RUN's first check: ``immediate_exit`` (a kick: the VMM's signal) fails it with EINTR before any
        state is looked at, as ``kvm_arch_vcpu_ioctl_run`` does with ``!vcpu->wants_to_run``."""
        if immediate_exit:
            raise KvmError(errno.EINTR, "KVM_RUN")

    def interrupted(self, blocked: bool) -> KvmError:
        """The error KVM_RUN fails with when a signal (a kick) ends it before an exit: EINTR, the run's exit reason
        KVM_EXIT_INTR — ``xfer_to_guest_mode_handle_work`` on the way into the guest, ``kvm_vcpu_check_block``
        while ``blocked`` in ``kvm_vcpu_block``. The caller raises it."""
        if blocked:
            return KvmError(errno.EINTR, "KVM_RUN", "blocked vCPU woken by a signal")
        return KvmError(errno.EINTR, "KVM_RUN")

    def run_failed(self, fault: MemoryFault) -> KvmError:
        """The error KVM_RUN fails with for a fault the kernel does not report in ``kvm_run`` (``MemoryFault`` not
        ``reported``): ``kvm_handle_error_pfn``'s bare -EFAULT when the memslot's userspace address cannot be
        faulted in (KVM_PFN_ERR_FAULT), no exit filled (``exit_reason`` stays the KVM_EXIT_UNKNOWN that ``vcpu_run``
        set on entry). The caller raises it."""
        why = "the memslot's userspace address is not host memory known to be mapped (KVM_PFN_ERR_FAULT)"
        return KvmError(fault.errno, "KVM_RUN", f"gpa {fault.gpa:#x}: {why}")

    @property
    def must_block(self) -> bool:
        """``kvm_vcpu_block`` on entry: a halted vCPU, or an AP waiting for INIT/SIPI, does not enter the guest;
        no interrupt controller is modelled, so only a signal ends the wait (the engine's EINTR)."""
        return self.mp_state != uapi.KVM_MP_STATE_RUNNABLE

    def entered(self) -> None:
        """``vcpu_enter_guest`` reached the guest: the vCPU has run (its CPUID table is frozen from now)."""
        self.has_run = True

    def emulate_halt(self) -> bool:
        """``__kvm_emulate_halt`` after the guest's HLT: with an in-kernel local APIC the vCPU halts in the kernel
        (HALTED, RIP after the HLT) and the caller blocks (True); without one the HLT exits to userspace (False)."""
        if not self.lapic:
            return False
        self.mp_state = uapi.KVM_MP_STATE_HALTED
        return True

    # --- KVM_RUN in RESET's real mode -------------------------------------------------------------------------

    def reset_fetch_gpa(self, cr0: int, cs_base: int, rip: int) -> int:
        """The gpa of the first instruction fetch of a vCPU whose segments were never loaded (CS.base + IP).

        The sim's engine follows loaded long-mode state only, so protected mode it was given no paging structures
        for is EINVAL. From here the vCPU counts as having run.
        """
        if cr0 & _X86_CR0_PE:
            raise KvmError(errno.EINVAL, "KVM_RUN", "the sim runs loaded long-mode state only (KVM_SET_SREGS first)")
        self.has_run = True
        return (cs_base + (rip & 0xFFFF)) & 0xFFFFFFFF

    def reset_fetch(
        self, gpa: int, result: FaultResult, signal_pending: Callable[[], bool]
    ) -> Mmio | MemoryFault | None:
        """What KVM_RUN makes of the TDP fault ``result`` for the real-mode fetch at ``gpa``.

        MMIO (no memslot): the emulator cannot fetch an instruction from MMIO, so KVM_RUN exits with
        KVM_INTERNAL_ERROR_EMULATION (``handle_emulation_failure``); a memory fault exits to userspace as
        such (or fails KVM_RUN without one, ``run_failed``); a fault that must be retried is retried (None),
        unless a signal is pending (EINTR). Code that really is in memory cannot be followed by the sim: EINVAL.
        """
        if isinstance(result, MemoryFault) and not result.reported:
            raise self.run_failed(result)
        if isinstance(result, (Mmio, MemoryFault)):
            return result
        if isinstance(result, Retry):
            if signal_pending():
                raise KvmError(errno.EINTR, "KVM_RUN")
            return None
        raise KvmError(errno.EINVAL, "KVM_RUN", f"the sim cannot execute real-mode code (fetch at gpa {gpa:#x}); "
                       "load a long-mode state with KVM_SET_SREGS and KVM_SET_REGS first")  # fmt: skip
