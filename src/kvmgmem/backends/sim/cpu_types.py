"""The narrow contract between the sim's CPU layer and the sim VM: fault results and the resolver protocol.

The CPU layer (``cpu.py``) is unicorn plus a software page walker; it knows nothing about memslots,
attributes or guest_memfd. Every guest-physical access it cannot satisfy from unicorn's TLB goes through one
call, ``GpaResolver.handle_fault``, which is the sim VM's equivalent of KVM's TDP page fault
(``kvm_mmu_faultin_pfn``). The
VM answers with one of the four results below. They are plain dataclasses (treated as immutable) so the VM side can
import them without pulling in unicorn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Mapped:
    """The gpa is backed by host memory.

    ``host_ptr`` is the process address of the *start* of the backing mapping (``size`` bytes: 4 KiB, 2 MiB or
    any power of two, naturally aligned in gpa space; the CPU maps 4 KiB of it per TLB entry), inside a store
    registered with ``CpuSet.add_store``. ``writable`` says
    whether the mapping may be written (False for a read-only memslot, for example); a write through a
    non-writable mapping faults again with ``write=True``.
    """

    host_ptr: int
    size: int = PAGE_SIZE
    writable: bool = True


@dataclass(frozen=True)
class MemoryFault:
    """KVM_EXIT_MEMORY_FAULT: ``run()`` returns ``exits.MemoryFaultExit`` with these fields
    (``kvm_mmu_prepare_memory_fault_exit``).

    ``errno`` is EFAULT or EHWPOISON (what KVM_RUN fails with). The faulting instruction has not executed;
    running again after the VMM fixed the cause re-executes it.
    """

    flags: int
    gpa: int
    size: int
    errno: int


@dataclass(frozen=True)
class Mmio:
    """No memslot covers the gpa (or a write hit a read-only slot): the access becomes KVM_EXIT_MMIO."""


@dataclass(frozen=True)
class Retry:
    """An invalidation covering the gpa is in progress (``kvm_mmu_invalidate_begin``/``_end``): the vCPU leaves the
    guest, services
    pending requests (TLB flushes) and retries the access."""


FaultResult = Mapped | MemoryFault | Mmio | Retry


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
