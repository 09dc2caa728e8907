"""``Vcpu`` on the sim: the API object over one ``SimCpu`` (a unicorn engine, ``cpu/``).

Why a separate object: ``SimCpu`` is the execution engine with KVM's run semantics; this class is the
kernel-object side — an fd, a VM reference (a vCPU pins its VM as a vCPU fd does), the architectural RESET
state a fresh vCPU reports before userspace loads its own, and lifetime. Every rule of the vCPU ioctls (CPUID table,
mp_state, KVM_RUN's EINTR and what the sim cannot follow) is the core's ``VcpuCore`` (``core/vcpu.py``): this
class loads the vCPU (``SimCpu.loaded``), asks the core, and carries out the answer on the engine.
"""

from __future__ import annotations

import os
import time
import weakref
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api import Vcpu
from kvmgmem.exits import Exit, HltExit

from . import fdtable
from .core.prefault import pre_fault_memory
from .core.vcpu import reset_regs, reset_sregs
from .core.vm import VmCore
from .cpu.types import Interrupted, UnreportedFault, fault_exit
from .exit_info import EXIT_REASON_EPT_VIOLATION, emulation_failure, ept_violation_qualification
from .fault import Mmio

if TYPE_CHECKING:
    from .cpu import CpuSet
    from .vm import SimVm


def _close_vcpu(fd: int, core: VmCore) -> None:
    os.close(fd)
    core.put()


class SimVcpu(Vcpu):
    """A vCPU of a sim VM. It holds a VM reference (as a vCPU fd does)."""

    def __init__(self, vm: SimVm, vcpu_id: int, cpus: CpuSet) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        # Until userspace loads a state, the vCPU reports RESET state (unicorn starts in its own long mode).
        self._regs: uapi.kvm_regs | None = reset_regs()
        self._sregs: uapi.kvm_sregs | None = reset_sregs()
        core = self._core = vm.sim
        #: The model's vCPU (``core/vcpu.py``: mp_state, CPUID table, has-run), made as ``kvm_arch_vcpu_create``.
        self.sim = core.arch.vcpu_create(vcpu_id)
        self._cpu = cpus.create_cpu(vcpu_id)
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
        """``kvm_vcpu_ioctl_set_cpuid2`` (``VcpuCore.set_cpuid2`` decides); the engine answers CPUID from the new
        table. The runtime-refreshed table it compares with after a run is the engine's."""
        with self._cpu.loaded("KVM_SET_CPUID2"):
            entries = self.sim.set_cpuid2(table, self._cpu.cpuid_entries)
            if entries is not None:
                self._cpu.set_cpuid(entries)

    @property
    def cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        return list(self.sim.cpuid)

    def _get_cpuid2(self, cpuid: Any) -> None:
        self.sim.get_cpuid2(cpuid.nent)
        entries = self._cpu.cpuid_entries()
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        cpuid.nent = len(entries)

    def _get_mp_state(self) -> uapi.kvm_mp_state:
        with self._cpu.loaded("KVM_GET_MP_STATE"):
            self._accept_events()
            return uapi.kvm_mp_state(mp_state=self.sim.mp_state)

    def _accept_events(self) -> None:
        """``kvm_apic_accept_events`` (``VcpuCore.accept_events``): a delivered SIPI loads its vector's entry."""
        vector = self.sim.accept_events()
        if vector is None:
            return
        regs, sregs = self._get_regs(), self._get_sregs()
        sregs.cs.selector, sregs.cs.base = vector << 8, vector << 12
        regs.rip = 0
        if self._sregs is not None:  # still the RESET state: change the copy the vCPU reports
            self._sregs = sregs
        else:
            self._cpu.set_sregs(sregs)
        if self._regs is not None:
            self._regs = regs
        else:
            self._cpu.set_regs(regs)

    def _set_mp_state(self, state: uapi.kvm_mp_state) -> None:
        """``kvm_arch_vcpu_ioctl_set_mpstate`` (``VcpuCore.set_mp_state``)."""
        with self._cpu.loaded("KVM_SET_MP_STATE"):
            self.sim.set_mp_state(state.mp_state)

    def _get_tsc_khz(self) -> int:
        return self._core.profile.tsc_khz  # vcpu->arch.virtual_tsc_khz, from the VM's default at creation

    def _pre_fault_memory(self, rng: uapi.kvm_pre_fault_memory) -> None:
        with self._cpu.loaded("KVM_PRE_FAULT_MEMORY"):  # vcpu_load: waits for a KVM_RUN on another thread
            rng.gpa, rng.size = pre_fault_memory(self._core, rng.gpa, rng.size, rng.flags, self._cpu.take_signal)

    def _run(self) -> Exit:
        vcpu = self.sim
        vcpu.run_entry(immediate_exit=self._cpu.take_kick())  # EINTR before every state check, as in KVM
        self._accept_events()
        try:  # a kick ends a block or a run with Interrupted: the engine reports it, the core says it is EINTR
            if vcpu.must_block:
                self._cpu.block("KVM_RUN")  # kvm_vcpu_block: only a kick ends it
            if self._sregs is not None:  # never loaded: real mode, as after RESET
                exit = self._run_real_mode()
            else:
                if self._regs is not None:  # segments and control registers loaded, GPRs still RESET's
                    self._cpu.set_regs(self._regs)
                    self._regs = None
                vcpu.entered()
                exit = self._cpu.run()
                if isinstance(exit, HltExit) and vcpu.emulate_halt():
                    self._cpu.block("KVM_RUN")  # halted in the kernel: only an interrupt would wake it
        except Interrupted as stop:
            raise vcpu.interrupted(stop.blocked) from None
        if type(exit) is UnreportedFault:
            raise vcpu.run_failed(exit.fault)
        return exit

    def _run_real_mode(self) -> Exit:
        """KVM_RUN in the RESET state's real mode, as far as the sim can follow it.

        The CPU emulator runs only loaded long-mode state, but the first thing a real-mode vCPU does is fetch
        at CS.base + IP (0xfffffff0 after RESET) and the kernel decides that fetch: with no memslot there it
        is MMIO, and the emulator cannot fetch an instruction from MMIO, so KVM_RUN exits with
        KVM_INTERNAL_ERROR_EMULATION (``handle_emulation_failure`` at CPL0; set_memory_region_test's
        zero-memory-regions case). The exit's data is what VMX reports for that fetch (an EPT violation,
        ``exit_info``); RIP stays at the instruction. Code that really is in memory cannot run: EINVAL. The
        core decides each of these (``VcpuCore.reset_fetch_gpa``, ``VcpuCore.reset_fetch``).
        """
        with self._cpu.loaded("KVM_RUN"):
            regs, sregs = self._get_regs(), self._get_sregs()
            gpa = self.sim.reset_fetch_gpa(sregs.cr0, sregs.cs.base, regs.rip)
            while True:
                result = self._core.handle_fault(gpa, write=False, fetch=True)
                outcome = self.sim.reset_fetch(gpa, result, self._cpu.take_kick)
                if outcome is None:  # retried, as the fault path does
                    time.sleep(0)
                elif isinstance(outcome, Mmio):
                    return emulation_failure(EXIT_REASON_EPT_VIOLATION, ept_violation_qualification(fetch=True))
                else:
                    return fault_exit(outcome)

    def _complete_io(self, data: bytes) -> None:
        self._cpu.complete_io(data)

    def _complete_mmio(self, data: bytes) -> None:
        self._cpu.complete_mmio(data)

    def _complete_hypercall(self, ret: int) -> None:
        self._cpu.complete_hypercall(ret)

    def kick(self) -> None:
        if not self.closed:
            self._cpu.kick()
