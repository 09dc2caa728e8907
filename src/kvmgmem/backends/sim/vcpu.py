"""``Vcpu`` on the sim: the API object over one ``SimCpu`` (a unicorn engine, ``cpu/``).

Why a separate object: ``SimCpu`` is the execution engine with KVM's run semantics; this class is the
kernel-object side — an fd, a VM reference (a vCPU pins its VM as a vCPU fd does), the architectural RESET
state a fresh vCPU reports before userspace loads its own, CPUID storage and lifetime.
"""

from __future__ import annotations

import errno
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api import Vcpu
from kvmgmem.errors import KvmError
from kvmgmem.exits import Exit, HltExit, MemoryFaultExit

from . import cpuid, fdtable
from .core.prefault import pre_fault_memory
from .core.vm import VmCore
from .exit_info import EXIT_REASON_EPT_VIOLATION, emulation_failure, ept_violation_qualification
from .fault import MemoryFault, Mmio, Retry

if TYPE_CHECKING:
    from .cpu import CpuSet
    from .vm import SimVm


def _close_vcpu(fd: int, core: VmCore) -> None:
    os.close(fd)
    core.put()


def reset_regs() -> uapi.kvm_regs:
    """Architectural RESET state of the GPRs (what KVM_GET_REGS shows on a fresh vCPU)."""
    regs = uapi.kvm_regs()
    regs.rip = 0xFFF0
    regs.rflags = 0x2
    return regs


def reset_sregs() -> uapi.kvm_sregs:
    """Architectural RESET state: real mode, CS base 0xffff0000 so the first fetch is at 0xfffffff0."""
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


class SimVcpu(Vcpu):
    """A vCPU of a sim VM. It holds a VM reference (as a vCPU fd does)."""

    def __init__(self, vm: SimVm, vcpu_id: int, cpus: CpuSet) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        # Until userspace loads a state, the vCPU reports RESET state (unicorn starts in its own long mode).
        self._regs: uapi.kvm_regs | None = reset_regs()
        self._sregs: uapi.kvm_sregs | None = reset_sregs()
        self._cpuid: list[uapi.kvm_cpuid_entry2] = []
        # kvm_arch_vcpu_create: an in-kernel local APIC comes with the VM's irqchip; then only the BSP (vCPU 0)
        # starts RUNNABLE, the others wait for INIT/SIPI (which nothing in the sim sends).
        self._lapic = vm.irqchip
        runnable = not self._lapic or vcpu_id == 0
        self._mp_state = uapi.KVM_MP_STATE_RUNNABLE if runnable else uapi.KVM_MP_STATE_UNINITIALIZED
        self._ran = False  # entered the guest once (last_vmentry_cpu != -1): the CPUID table is frozen
        self._sipi_pending = False  # KVM_APIC_SIPI in apic->pending_events (the vector is 0: none was sent)
        self._cpu = cpus.create_cpu(vcpu_id)
        core = self._core = vm.core
        core.get()
        self._fd = fdtable.placeholder_fd()
        self._finalizer = weakref.finalize(self, _close_vcpu, self._fd, core)

    @property
    def fd(self) -> int:
        return self._fd

    def _release(self) -> None:
        self._cpu.close()
        self._finalizer()

    def _get_regs(self) -> uapi.kvm_regs:
        if self._regs is not None:
            return uapi.kvm_regs.from_buffer_copy(self._regs)
        return self._cpu.get_regs()

    def _set_regs(self, regs: uapi.kvm_regs) -> None:
        self._cpu.set_regs(regs)
        self._regs = None

    def _get_sregs(self) -> uapi.kvm_sregs:
        if self._sregs is not None:
            return uapi.kvm_sregs.from_buffer_copy(self._sregs)
        return self._cpu.get_sregs()

    def _set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self._cpu.set_sregs(sregs)
        self._sregs = None

    def _set_cpuid2(self, table: Any) -> None:
        """``kvm_vcpu_ioctl_set_cpuid2`` / ``kvm_set_cpuid``: E2BIG past 256 entries; once the vCPU has run only
        the same table is accepted (EINVAL otherwise, ``kvm_cpuid_check_equal``, compared with the KVM-owned
        bits refreshed); EINVAL for a table ``kvm_check_cpuid`` refuses."""
        op = "KVM_SET_CPUID2"
        if table.nent > uapi.KVM_MAX_CPUID_ENTRIES:
            raise KvmError(errno.E2BIG, op, f"{table.nent} entries > KVM_MAX_CPUID_ENTRIES (256)")
        entries = [uapi.kvm_cpuid_entry2.from_buffer_copy(table.entries[i]) for i in range(table.nent)]
        with self._cpu.loaded(op):
            if self._ran:
                if not cpuid.same_table(entries, self._cpu.cpuid_entries()):
                    raise KvmError(errno.EINVAL, op, "the vCPU has run: only the same CPUID table may be set again")
                return
            why = cpuid.check_table(entries)
            if why is not None:
                raise KvmError(errno.EINVAL, op, why)
            self._cpuid = entries
            self._cpu.set_cpuid(entries)

    @property
    def cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        return list(self._cpuid)

    def _get_cpuid2(self, cpuid: Any) -> None:
        entries = self._cpu.cpuid_entries()
        if cpuid.nent < len(entries):
            raise KvmError(errno.E2BIG, "KVM_GET_CPUID2", f"{len(entries)} entries, room for {cpuid.nent}")
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        cpuid.nent = len(entries)

    def _get_mp_state(self) -> uapi.kvm_mp_state:
        with self._cpu.loaded("KVM_GET_MP_STATE"):
            self._accept_events()
            return uapi.kvm_mp_state(mp_state=self._mp_state)

    def _accept_events(self) -> None:
        """``kvm_apic_accept_events``: a pending SIPI starts a vCPU waiting in INIT_RECEIVED at the SIPI
        vector's entry (``kvm_vcpu_deliver_sipi_vector``: CS selector ``vector << 8``, base ``vector << 12``,
        RIP 0; the vector is 0 as no SIPI message is modelled)."""
        if not self._sipi_pending:
            return
        self._sipi_pending = False
        if self._mp_state != uapi.KVM_MP_STATE_INIT_RECEIVED:
            return
        regs, sregs = self._get_regs(), self._get_sregs()
        sregs.cs.selector = sregs.cs.base = 0
        regs.rip = 0
        if self._sregs is not None:  # still the RESET state: change the copy the vCPU reports
            self._sregs = sregs
        else:
            self._cpu.set_sregs(sregs)
        if self._regs is not None:
            self._regs = regs
        else:
            self._cpu.set_regs(regs)
        self._mp_state = uapi.KVM_MP_STATE_RUNNABLE

    def _set_mp_state(self, state: uapi.kvm_mp_state) -> None:
        """``kvm_arch_vcpu_ioctl_set_mpstate``."""
        op = "KVM_SET_MP_STATE"
        value = state.mp_state
        needs_lapic = (
            uapi.KVM_MP_STATE_UNINITIALIZED,
            uapi.KVM_MP_STATE_HALTED,
            uapi.KVM_MP_STATE_AP_RESET_HOLD,
            uapi.KVM_MP_STATE_INIT_RECEIVED,
            uapi.KVM_MP_STATE_SIPI_RECEIVED,
        )
        with self._cpu.loaded(op):
            if value in needs_lapic and not self._lapic:
                raise KvmError(errno.EINVAL, op, f"mp_state {value} needs an in-kernel local APIC")
            if value != uapi.KVM_MP_STATE_RUNNABLE and value not in needs_lapic:
                raise KvmError(errno.EINVAL, op, f"unknown mp_state {value}")
            if value == uapi.KVM_MP_STATE_SIPI_RECEIVED:  # obsolete: INIT_RECEIVED with the SIPI pending
                value = uapi.KVM_MP_STATE_INIT_RECEIVED
                self._sipi_pending = True
            self._mp_state = value

    def _get_tsc_khz(self) -> int:
        return self._core.profile.tsc_khz  # vcpu->arch.virtual_tsc_khz, from the VM's default at creation

    def _pre_fault_memory(self, rng: uapi.kvm_pre_fault_memory) -> None:
        with self._cpu.loaded("KVM_PRE_FAULT_MEMORY"):  # vcpu_load: waits for a KVM_RUN on another thread
            rng.gpa, rng.size = pre_fault_memory(self._core, rng.gpa, rng.size, rng.flags, self._cpu.take_signal)

    def _run(self) -> Exit:
        if self._cpu.take_kick():  # immediate_exit wins over every state check, as in KVM
            raise KvmError(errno.EINTR, "KVM_RUN")
        self._accept_events()
        if self._mp_state != uapi.KVM_MP_STATE_RUNNABLE:
            # kvm_vcpu_block: halted, or an AP waiting for INIT/SIPI; no interrupt controller is modelled, so
            # only a signal (a kick) ends the wait, with EINTR.
            self._cpu.block("KVM_RUN")
        if self._sregs is not None:  # never loaded: real mode, as after RESET
            return self._run_real_mode()
        if self._regs is not None:  # segments and control registers loaded, GPRs still RESET's
            self._cpu.set_regs(self._regs)
            self._regs = None
        self._ran = True
        exit = self._cpu.run()
        if self._lapic and isinstance(exit, HltExit):
            # __kvm_emulate_halt with an in-kernel local APIC: the vCPU halts in the kernel (RIP after the HLT)
            # instead of exiting to userspace, and only an interrupt would wake it.
            self._mp_state = uapi.KVM_MP_STATE_HALTED
            self._cpu.block("KVM_RUN")
        return exit

    def _run_real_mode(self) -> Exit:
        """KVM_RUN in the RESET state's real mode, as far as the sim can follow it.

        The CPU emulator runs only loaded long-mode state, but the first thing a real-mode vCPU does is fetch
        at CS.base + IP (0xfffffff0 after RESET) and the kernel decides that fetch: with no memslot there it
        is MMIO, and the emulator cannot fetch an instruction from MMIO, so KVM_RUN exits with
        KVM_INTERNAL_ERROR_EMULATION (``handle_emulation_failure`` at CPL0; set_memory_region_test's
        zero-memory-regions case). The exit's data is what VMX reports for that fetch (an EPT violation,
        ``exit_info``); RIP stays at the instruction. Code that really is in memory cannot run: EINVAL.
        """
        op = "KVM_RUN"
        with self._cpu.loaded(op):
            regs, sregs = self._get_regs(), self._get_sregs()
            if sregs.cr0 & 1:  # protected mode without paging structures the sim was given: not followable
                raise KvmError(errno.EINVAL, op, "the sim runs loaded long-mode state only (KVM_SET_SREGS first)")
            gpa = (sregs.cs.base + (regs.rip & 0xFFFF)) & 0xFFFFFFFF
            self._ran = True
            while True:
                result = self._core.handle_fault(gpa, write=False, fetch=True)
                if isinstance(result, Mmio):
                    return emulation_failure(EXIT_REASON_EPT_VIOLATION, ept_violation_qualification(fetch=True))
                if isinstance(result, MemoryFault):
                    return MemoryFaultExit(result.flags, result.gpa, result.size, result.errno)
                if isinstance(result, Retry):
                    if self._cpu.take_kick():
                        raise KvmError(errno.EINTR, op)
                    time.sleep(0)
                    continue
                raise KvmError(errno.EINVAL, op, f"the sim cannot execute real-mode code (fetch at gpa {gpa:#x}); "
                               "load a long-mode state with KVM_SET_SREGS and KVM_SET_REGS first")  # fmt: skip

    def _complete_io(self, data: bytes) -> None:
        self._cpu.complete_io(data)

    def _complete_mmio(self, data: bytes) -> None:
        self._cpu.complete_mmio(data)

    def _complete_hypercall(self, ret: int) -> None:
        self._cpu.complete_hypercall(ret)

    def kick(self) -> None:
        if not self.closed:
            self._cpu.kick()
