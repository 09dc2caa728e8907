"""The narrow contract between the sim's CPU layer and the sim VM: fault results, the resolver protocol, and what
ends a run without an exit.

The CPU layer (this package) is unicorn plus a software page walker; it knows nothing about memslots,
attributes or guest_memfd. Every guest-physical access it cannot satisfy from unicorn's TLB goes through one
call, ``GpaResolver.handle_fault``, which is the sim VM's equivalent of KVM's TDP page fault
(``kvm_mmu_faultin_pfn``). The
VM answers with one of the four results of ``fault`` (``Mapped``, ``MemoryFault``, ``Mmio``, ``Retry``, re-exported
here): the same objects the kernel model builds, since both layers import that leaf module. A hypercall is
answered the same way (``GpaResolver.emulate_hypercall``), and a run or a block that a kick ends reports
``Interrupted``: the CPU decides no kernel rule and no errno but the fd layer's EBADF for a closed vCPU
(``tests/sim/cpu/test_no_errno.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvmgmem.backends.sim.fault import PAGE_SIZE, FaultResult, Mapped, MemoryFault, Mmio, Retry
from kvmgmem.exits import Exit, HypercallExit, MemoryFaultExit

HUGE_PAGE_SIZE = 2 << 20


@runtime_checkable
class GpaResolver(Protocol):
    """What the sim VM implements for the CPU layer: the TDP fault handler.

    ``handle_fault(gpa, write, fetch)`` is called on the vCPU's thread, with the GIL held, from inside
    unicorn's TLB-fill hook (for guest data and code pages) and from the software page walker (for guest
    page-table entries, ``write=False, fetch=False``). ``gpa`` is the exact guest-physical byte address.
    It may call ``SimCpu.flush``/``CpuSet.flush`` (the CPU handles flushes requested from inside its own
    hooks without deadlocking) but must not call ``run()``.

    ``private`` (optional; only passed by keyword, and only when the CPU has a private access bit, see
    ``CpuSet(private_access_bit=...)``): True/False = the access is private/shared as the guest's leaf PTE
    says (hardware that reports the access type, as SNP and TDX do); an access that disagrees with the gfn's
    attribute answers ``MemoryFault`` (flags PRIVATE iff ``private``). Resolvers written against the
    three-argument form keep working: the CPU never passes ``private`` unless the bit is enabled.
    """

    def handle_fault(self, gpa: int, write: bool, fetch: bool, private: bool | None = None) -> FaultResult: ...

    def emulate_hypercall(self, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallExit:
        """KVM's ``kvm_emulate_hypercall`` for a VMCALL/VMMCALL the guest executed at ``cpl`` with RAX = ``nr``
        and RBX, RCX, RDX, RSI = ``a0..a3`` (vCPU thread, no lock held). An int is the hypercall's return value
        (negative: -KVM_E*), which the CPU writes to RAX before stepping over the instruction; a
        ``HypercallExit`` is KVM_EXIT_HYPERCALL, and userspace's ``complete_hypercall`` answer becomes RAX."""
        ...


class Interrupted(Exception):
    """``SimCpu.run()`` or ``SimCpu.block()`` ended because of a kick (the VMM's signal), with no exit.

    The CPU only reports it: KVM_RUN's EINTR for it is the kernel model's rule (``VcpuCore.interrupted``), as
    ``kvm_vcpu_check_block`` and ``xfer_to_guest_mode_handle_work`` make a pending signal fail KVM_RUN with
    -EINTR (KVM_EXIT_INTR). ``blocked``: the vCPU was waiting in ``kvm_vcpu_block`` rather than running.
    """

    def __init__(self, blocked: bool = False) -> None:
        super().__init__("blocked vCPU woken by a signal" if blocked else "vCPU kicked")
        self.blocked = blocked


@dataclass(frozen=True)
class UnreportedFault(Exit):
    """What ``SimCpu.run()`` returns for a ``MemoryFault`` that is not ``reported``: KVM_RUN fails with the fault's
    errno and no exit reason. It never reaches the API: the vCPU adapter raises the kernel model's error for it
    (``VcpuCore.run_failed``)."""

    fault: MemoryFault


def fault_exit(fault: MemoryFault) -> Exit:
    """The exit a run ends in for the resolver's ``MemoryFault``: KVM_EXIT_MEMORY_FAULT when the model reports it,
    else ``UnreportedFault``."""
    if fault.reported:
        return MemoryFaultExit(fault.flags, fault.gpa, fault.size, fault.errno)
    return UnreportedFault(fault)


__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "FaultResult",
    "GpaResolver",
    "Interrupted",
    "Mapped",
    "MemoryFault",
    "Mmio",
    "Retry",
    "UnreportedFault",
    "fault_exit",
]
