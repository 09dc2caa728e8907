"""``Vcpu`` on the sim, without execution: register state storage and the KVM_RUN placeholder.

Why separate from execution: the unicorn CPU (part 2, ``cpu*.py``) subclasses ``SimVcpu`` and exposes it as
``kvmgmem.backends.sim.cpu.VCPU_CLASS``; ``SimVm.create_vcpu`` picks it up when present. Until then
``run()`` fails with ENOSYS, and everything else (regs, sregs, cpuid, the completion answers) works.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.api import Vcpu
from kvmgmem.errors import KvmError
from kvmgmem.exits import Exit

from . import fdtable
from .core.vm import VmCore

if TYPE_CHECKING:
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

    def __init__(self, vm: SimVm, vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self._regs = reset_regs()
        self._sregs = reset_sregs()
        self._cpuid: list[uapi.kvm_cpuid_entry2] = []
        self.pending_io: bytes | None = None
        self.pending_mmio: bytes | None = None
        self.pending_hypercall_ret: int | None = None
        self.immediate_exit = False
        core = vm.core
        core.get()
        self._fd = fdtable.placeholder_fd()
        self._finalizer = weakref.finalize(self, _close_vcpu, self._fd, core)

    @property
    def fd(self) -> int:
        return self._fd

    def _release(self) -> None:
        self._finalizer()

    def get_regs(self) -> uapi.kvm_regs:
        self._check_open("KVM_GET_REGS")
        return uapi.kvm_regs.from_buffer_copy(self._regs)

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self._check_open("KVM_SET_REGS")
        self._regs = uapi.kvm_regs.from_buffer_copy(regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        self._check_open("KVM_GET_SREGS")
        return uapi.kvm_sregs.from_buffer_copy(self._sregs)

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self._check_open("KVM_SET_SREGS")
        self._sregs = uapi.kvm_sregs.from_buffer_copy(sregs)

    def set_cpuid(self, entries: Iterable[uapi.kvm_cpuid_entry2] | None = None) -> None:
        self._check_open("KVM_SET_CPUID2")
        if entries is None:
            entries = self.vm.system.get_supported_cpuid()
        self._cpuid = [uapi.kvm_cpuid_entry2.from_buffer_copy(e) for e in entries]

    @property
    def cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        return list(self._cpuid)

    def run(self) -> Exit:
        self._check_open("KVM_RUN")
        raise KvmError(errno.ENOSYS, "KVM_RUN", "sim vCPU execution not available yet")

    def complete_io(self, data: bytes) -> None:
        self.pending_io = bytes(data)

    def complete_mmio(self, data: bytes) -> None:
        self.pending_mmio = bytes(data)

    def complete_hypercall(self, ret: int) -> None:
        self.pending_hypercall_ret = ret & ((1 << 64) - 1)

    def kick(self) -> None:
        self.immediate_exit = True
