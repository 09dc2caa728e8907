"""The outcome of the sim's TDP fault: one set of types for the kernel model and the CPU that consumes it.

Why a module of its own: ``core/mmu.py`` builds these results (``kvm_mmu_faultin_pfn``'s outcomes) and
the CPU layer (``cpu/``) acts on them, but the CPU layer may not import the core and the core imports nothing above
``uapi`` and ``errors``. Both may import this leaf (it imports only ``uapi`` and the standard library), so a
fault's result reaches the vCPU as the object the model made, with no translation on the hot path.

What each result means, and the full CPU contract, is in ``core/mmu.py``'s docstring; ``cpu.types.GpaResolver``
is the call that returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmgmem.uapi import PAGE_SIZE


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Mapped:
    """The gpa is backed by host memory: an SPTE now maps ``[gpa, gpa + size)`` to ``[host_ptr, host_ptr + size)``.

    ``host_ptr`` is the process address of the *start* of the mapping (``size`` bytes: 4 KiB, 2 MiB or 1 GiB,
    naturally aligned in gpa space; the CPU maps 4 KiB of it per TLB entry), inside a store registered with
    ``CpuSet.add_store``. ``writable`` False (a read-only memslot) means a write must fault again with
    ``write=True``. The rest is what the model knows and tests inspect: ``gpa`` the mapping's first byte,
    ``level`` (1/2/3 for 4 KiB/2 MiB/1 GiB), ``gmem`` (served from a guest_memfd rather than the memslot's
    userspace address), ``spurious`` (the SPTE already existed). A resolver other than the model (a test's)
    may leave them at their defaults; the CPU reads only the first three.
    """

    host_ptr: int
    size: int = PAGE_SIZE
    writable: bool = True
    gpa: int = 0
    level: int = 1
    gmem: bool = False
    spurious: bool = False

    def host_address_of(self, gpa: int) -> int:
        """The host address of guest-physical byte ``gpa`` inside this mapping."""
        return self.host_ptr + (gpa - self.gpa)


@dataclass(frozen=True)
class MemoryFault:
    """KVM_RUN fails with ``errno`` (EFAULT, EHWPOISON, ...); the faulting instruction has not executed, and running
    again after the VMM fixed the cause re-executes it.

    ``reported`` (the default): KVM_EXIT_MEMORY_FAULT (``kvm_mmu_prepare_memory_fault_exit``), so ``run()`` returns an
    ``exits.MemoryFaultExit`` with these fields. Not ``reported``: the bare -EFAULT of ``kvm_handle_error_pfn`` for a
    memslot whose userspace address cannot be faulted in (KVM_PFN_ERR_FAULT), which fills no exit, so ``run()``
    raises ``KvmError``; ``flags``/``gpa``/``size`` are then only the model's record of the access."""

    flags: int
    gpa: int
    size: int
    errno: int
    reported: bool = True


@dataclass(frozen=True)
class Mmio:
    """No memslot covers the gpa (or a write hit a read-only slot): the access becomes KVM_EXIT_MMIO.
    ``gpa`` (page aligned) and ``write`` are the model's record of the fault; the CPU decodes the access itself."""

    gpa: int = 0
    write: bool = False


@dataclass(frozen=True)
class Retry:
    """Nothing was installed: an invalidation covering the gpa is in progress (``kvm_mmu_invalidate_begin``/
    ``_end``) or its memslot is being deleted or moved. The vCPU leaves the guest, services pending requests
    (TLB flushes) and retries the access; ``reason`` says which case, for tests and traces."""

    reason: str = ""
    #: The gfn hit a memslot being deleted or moved (KVM_MEMSLOT_INVALID): KVM_RUN retries, a prefault
    #: fails with EAGAIN instead (``kvm_mmu_faultin_pfn``).
    invalid_slot: bool = False


FaultResult = Mapped | MemoryFault | Mmio | Retry

__all__ = ["PAGE_SIZE", "FaultResult", "Mapped", "MemoryFault", "Mmio", "Retry"]
