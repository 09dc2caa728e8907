"""Issue 5 cases with real guest code on the sim's vCPUs: hwpoison, huge-page splitting, closed guest_memfd.

(PK-1/PK-2 and PC-1/PC-2 live in the installed conformance suite, kvmgmem.conformance.)
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import MemoryFaultExit
from kvmgmem.guest import Asm, GuestImage, GuestVm, Sync
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.hostmem import HostMemory

GPA = 4 << 30
SIZE = 4 << 20
PAGE = uapi.PAGE_SIZE
HUGE = 2 << 20
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


@pytest.fixture
def sim() -> Iterator[kvmgmem.System]:
    system = kvmgmem.open("sim")
    yield system
    system.close()


class Guest:
    """A SW_PROTECTED guest with one gmem slot at GPA, owning everything it made."""

    def __init__(self, system: kvmgmem.System, program: Asm) -> None:
        self.guest = GuestVm.create(system, GuestImage(program), vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
        self.vm = self.guest.vm
        # Shared memory 2 MiB aligned like the gpa, so shared accesses may map at 2 MiB (`hugepage_has_attrs` needs
        # compatible gfn/hva alignment): a view into a larger HostMemory.
        self.shared = HostMemory(SIZE + HUGE)
        skip = -self.shared.address % HUGE
        self.view = memoryview(self.shared)[skip : skip + SIZE]
        self.gmem = self.vm.create_guest_memfd(SIZE)
        self.guest.add_memory(1, GPA, self.view, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=self.gmem)
        self.vcpu = self.guest.create_vcpu()

    def close(self) -> None:
        self.guest.close()
        self.gmem.close()
        self.view.release()
        self.shared.close()


def test_poisoned_private_page_gives_ehwpoison(sim: kvmgmem.System) -> None:
    """`kvm_gmem_error_folio`/`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: a memory failure on a private
    page zaps it; the next guest access exits with KVM_EXIT_MEMORY_FAULT and KVM_RUN fails with EHWPOISON (flags
    PRIVATE, page-aligned gpa, size 4096)."""
    a = Asm()
    R.fill(a, GPA, 2 * PAGE, 0x5A)
    U.sync(a)
    R.verify(a, GPA + PAGE, PAGE, 0x5A, "page 1 still readable")
    U.sync(a)
    R.verify(a, GPA + 8, 8, 0x5A, "poisoned page")
    U.done(a)
    g = Guest(sim, a)
    try:
        g.vm.set_memory_attributes(GPA, SIZE, PRIVATE)
        assert isinstance(g.vcpu.run(), Sync)
        g.gmem.inject_poison(0)
        assert isinstance(g.vcpu.run(), Sync)  # the neighbouring page is unaffected
        exit = g.vcpu.run()
        assert exit == MemoryFaultExit(flags=uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa=GPA, size=PAGE,
                                       errno=uapi.EHWPOISON)  # fmt: skip
        assert exit.hwpoison
        assert isinstance(g.vcpu.run(), MemoryFaultExit)  # still poisoned: the same exit again
    finally:
        g.close()


def _shared_levels(vm: kvmgmem.Vm, lo: int, hi: int) -> set[int]:
    sptes = vm.introspect()["sptes"]  # type: ignore[index]  (the sim always has a snapshot)
    return {s["level"] for s in sptes if lo <= s["gfn"] < hi and s["backing"] == "hva"}


def test_one_private_page_splits_the_2m_region(sim: kvmgmem.System) -> None:
    """`hugepage_has_attrs`: shared mappings of a uniform 2 MiB region are 2 MiB; after one 4 KiB page of it becomes
    private the region is "mixed" and shared accesses there map at 4 KiB (seen through introspection)."""
    a = Asm()
    R.touch_pages(a, GPA, 2 << 20, value=None)
    U.sync(a)
    R.touch_pages(a, GPA + PAGE, (2 << 20) - PAGE, value=None)
    U.done(a)
    g = Guest(sim, a)
    try:
        first, end = GPA >> 12, (GPA + (2 << 20)) >> 12
        assert isinstance(g.vcpu.run(), Sync)
        assert _shared_levels(g.vm, first, end) == {2}
        g.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
        g.vcpu.run_to_done()
        levels = _shared_levels(g.vm, first, end)
        assert levels == {1}, levels
    finally:
        g.close()


def test_private_access_after_gmem_close_is_efault(sim: kvmgmem.System) -> None:
    """`kvm_gmem_release`/`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: closing the guest_memfd while bound
    unbinds it (the slot stays); a private access then exits with KVM_EXIT_MEMORY_FAULT, errno EFAULT."""
    a = Asm()
    R.fill(a, GPA, PAGE, 0x11)
    U.sync(a)
    R.verify(a, GPA, PAGE, 0x11, "private page")
    U.done(a)
    g = Guest(sim, a)
    try:
        g.vm.set_memory_attributes(GPA, PAGE, PRIVATE)
        assert isinstance(g.vcpu.run(), Sync)
        g.gmem.close()
        exit = g.vcpu.run()
        assert exit == MemoryFaultExit(flags=uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa=GPA, size=PAGE,
                                       errno=errno.EFAULT)  # fmt: skip
    finally:
        g.close()
