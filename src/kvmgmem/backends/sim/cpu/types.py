"""The narrow contract between the sim's CPU layer and the sim VM: fault results and the resolver protocol.

The CPU layer (this package) is unicorn plus a software page walker; it knows nothing about memslots,
attributes or guest_memfd. Every guest-physical access it cannot satisfy from unicorn's TLB goes through one
call, ``GpaResolver.handle_fault``, which is the sim VM's equivalent of KVM's TDP page fault
(``kvm_mmu_faultin_pfn``). The
VM answers with one of the four results of ``fault`` (``Mapped``, ``MemoryFault``, ``Mmio``, ``Retry``, re-exported
here): the same objects the kernel model builds, since both layers import that leaf module.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvmgmem.backends.sim.fault import PAGE_SIZE, FaultResult, Mapped, MemoryFault, Mmio, Retry

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


__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "FaultResult",
    "GpaResolver",
    "Mapped",
    "MemoryFault",
    "Mmio",
    "Retry",
]
