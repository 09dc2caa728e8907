"""The sim's fault path (`kvm_mmu_faultin_pfn`, `kvm_mmu_prepare_memory_fault_exit`), invalidations
(`kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end`), huge pages (`hugepage_has_attrs`, the v12 RFC's
KVM_GUEST_MEMFD_ALLOW_HUGEPAGE), and the CPU contract (``core/mmu.py``)."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, uapi
from kvmgmem.backends.sim import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, SimSystem, SimVm
from kvmgmem.backends.sim.cpu import types as cpu_types
from kvmgmem.backends.sim.fault import Mapped, MemoryFault, Mmio, Retry

from .conftest import GMEM, INIT_SHARED, M2, MMAP, PRIVATE, P

GPA = 0xC0000000
EXIT_PRIVATE = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE


def fault(vm: SimVm, gpa: int, write: bool = False, private: bool | None = None) -> object:
    return vm.sim.handle_fault(gpa, write, False, private)


def test_PK_2_private_access_to_non_gmem_slot(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """PK-2, `kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: PRIVATE gfn in a slot without GUEST_MEMFD →
    EFAULT exit, flags 8, page-aligned gpa."""
    pvm.set_user_memory_region(10, GPA, P, hostmem(P))
    pvm.set_memory_attributes(GPA, P, PRIVATE)
    r = fault(pvm, GPA + 0x123)
    assert r == MemoryFault(flags=EXIT_PRIVATE, gpa=GPA, errno=errno.EFAULT, size=P)


def test_PK_1_memslot_deleted(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """PK-1: after deleting the gmem slot a private access exits EFAULT with flags 8."""
    with pvm.create_guest_memfd(P) as g:
        pvm.set_user_memory_region2(10, GPA, P, hostmem(P), GMEM, g, 0)
        pvm.set_memory_attributes(GPA, P, PRIVATE)
        assert isinstance(fault(pvm, GPA), Mapped)
        pvm.set_user_memory_region2(10, GPA, 0, None, GMEM)
        assert fault(pvm, GPA) == MemoryFault(EXIT_PRIVATE, GPA, P, errno.EFAULT)
        assert pvm.introspect()["sptes"] == []


def test_3_3_shared_no_slot_is_mmio(pvm: SimVm) -> None:
    """`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit` / `kvm_gmem_unbind`: a shared access with no memslot →
    MMIO."""
    assert fault(pvm, 0x1234) == Mmio(0x1000, False)


def test_3_3_mismatch_exit(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: a fault whose private bit disagrees with the attribute
    exits EFAULT (flags = fault's)."""
    pvm.set_user_memory_region(0, GPA, P, hostmem(P))
    assert fault(pvm, GPA, private=True) == MemoryFault(EXIT_PRIVATE, GPA, P, errno.EFAULT)
    pvm.set_memory_attributes(GPA, P, PRIVATE)
    assert fault(pvm, GPA, private=False) == MemoryFault(0, GPA, P, errno.EFAULT)


def test_3_3_gmem_closed_efault(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_gmem_release`/`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: after the gmem is closed,
    private accesses exit EFAULT; deleting the slot works."""
    g = pvm.create_guest_memfd(P)
    pvm.set_user_memory_region2(10, GPA, P, hostmem(P), GMEM, g, 0)
    pvm.set_memory_attributes(GPA, P, PRIVATE)
    assert isinstance(fault(pvm, GPA), Mapped)
    g.close()
    assert fault(pvm, GPA) == MemoryFault(EXIT_PRIVATE, GPA, P, errno.EFAULT)
    pvm.set_user_memory_region2(10, GPA, 0)


def test_2_15_hwpoison(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_gmem_error_folio`: poison zaps the mapping, does not truncate, and the next access exits EHWPOISON; punching
    the page removes it."""
    with pvm.create_guest_memfd(2 * P) as g:
        pvm.set_user_memory_region2(10, GPA, 2 * P, hostmem(2 * P), GMEM, g, 0)
        pvm.set_memory_attributes(GPA, 2 * P, PRIVATE)
        assert isinstance(fault(pvm, GPA + P), Mapped)
        g.inject_poison(P + 5)
        assert pvm.introspect()["sptes"] == []
        assert g.introspect()["pages"] == [(0, 1, 0), (1, 2, 2)]
        assert fault(pvm, GPA + P) == MemoryFault(EXIT_PRIVATE, GPA + P, P, uapi.EHWPOISON)
        assert isinstance(fault(pvm, GPA), Mapped)
        g.punch_hole(P, P)
        assert isinstance(fault(pvm, GPA + P), Mapped)


def test_3_3_bad_hva_efault(dvm: SimVm) -> None:
    """`kvm_handle_error_pfn`: a shared access to a raw userspace_addr the sim cannot prove is mapped → EFAULT that
    is not reported as KVM_EXIT_MEMORY_FAULT (KVM_PFN_ERR_FAULT's bare -EFAULT); no SPTE, no exit counted."""
    dvm.set_user_memory_region(0, 0, M2, 0x10000000)
    assert fault(dvm, 0x2000) == MemoryFault(0, 0x2000, P, errno.EFAULT, reported=False)
    assert dvm.introspect()["sptes"] == []
    assert dvm.sim.mmu.counters.memory_fault_exits == 0


def test_3_3_readonly_write_is_mmio(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """A write to a READONLY slot → MMIO; reads map read-only."""
    mem = hostmem(P)
    dvm.set_user_memory_region(0, 0, P, mem, uapi.KVM_MEM_READONLY)
    r = fault(dvm, 0)
    assert isinstance(r, Mapped) and not r.writable and r.host_ptr == mem.address
    assert fault(dvm, 0, write=True) == Mmio(0, True)


def test_3_1_shared_and_private_backings_independent(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_mmu_faultin_pfn`/virt/kvm/guest_memfd.c (PC-1 property): shared data lives in the hva, private data in gmem;
    converting back and forth without punching shows each again; punching makes private read zero."""
    mem = hostmem(P)
    with pvm.create_guest_memfd(P) as g:
        pvm.set_user_memory_region2(10, GPA, P, mem, GMEM, g, 0)
        mem[0] = 0x11
        r = fault(pvm, GPA)
        assert isinstance(r, Mapped) and r.host_ptr == mem.address and not r.gmem
        pvm.set_memory_attributes(GPA, P, PRIVATE)
        r = fault(pvm, GPA)
        assert isinstance(r, Mapped) and r.gmem
        ctypes.memmove(r.host_ptr, b"\x22", 1)
        pvm.set_memory_attributes(GPA, P, 0)
        assert mem[0] == 0x11
        pvm.set_memory_attributes(GPA, P, PRIVATE)
        r = fault(pvm, GPA)
        assert isinstance(r, Mapped) and ctypes.string_at(r.host_ptr, 1) == b"\x22"
        g.punch_hole(0, P)
        r = fault(pvm, GPA)
        assert isinstance(r, Mapped) and ctypes.string_at(r.host_ptr, 1) == b"\x00"


def test_3_1_gmem_only_slot(dvm: SimVm, open_sim: Callable[..., SimSystem]) -> None:
    """`kvm_mmu_faultin_pfn` (6.18+): a slot bound to an MMAP gmem serves shared accesses from gmem (GM-13's host↔guest
    round trip); 6.8-style routing uses the hva."""
    with dvm.create_guest_memfd(P, MMAP | INIT_SHARED) as g, g.mmap() as m:
        dvm.set_user_memory_region2(1, 1 << 32, P, None, GMEM, g, 0)
        m[:] = b"\xaa" * P
        r = fault(dvm, 1 << 32)
        # the guest's page is the file's page; the host mapping is an alias of the same page
        assert isinstance(r, Mapped) and r.gmem and r.host_ptr == g.sim.inode.backing.address(0)
        assert ctypes.string_at(r.host_ptr, P) == b"\xaa" * P
        ctypes.memset(r.host_ptr, 0xFF, P)
        assert m[:] == b"\xff" * P
    with open_sim("6.8").create_vm(1) as old, old.create_guest_memfd(P) as g:
        old.set_user_memory_region2(1, 1 << 32, P, None, GMEM, g, 0)
        assert old.sim.handle_fault(1 << 32) == MemoryFault(0, 1 << 32, P, errno.EFAULT, reported=False)  # hva 0


def test_3_5_punch_zaps_and_refaults_zero(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end` / PC-2: PUNCH_HOLE zaps every bound gfn, notifies listeners
    with the gfn range, frees pages."""
    zaps: list[tuple[int, int]] = []
    with pvm.create_guest_memfd(4 * P) as g:
        pvm.set_user_memory_region2(10, GPA, 4 * P, hostmem(4 * P), GMEM, g, 0)
        pvm.set_memory_attributes(GPA, 4 * P, PRIVATE)
        for i in range(4):
            fault(pvm, GPA + i * P)
        pvm.add_zap_listener(lambda lo, hi: zaps.append((lo, hi)))
        g.punch_hole(P, 2 * P)
        assert zaps == [(GPA // P + 1, GPA // P + 3)]
        assert [s["gfn"] for s in pvm.introspect()["sptes"]] == [GPA // P, GPA // P + 3]
        info = g.introspect()
        assert info["pages_present"] == 2 and info["pages_freed"] == 2


def test_retry_during_invalidation(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`: faults in a range being invalidated (slot delete)
    retry; outside, they proceed."""
    mem = hostmem(2 * P)
    pvm.set_user_memory_region(0, GPA, P, mem)
    pvm.set_user_memory_region(1, GPA + P, P, memoryview(mem)[P:])
    results: list[object] = []
    pvm.add_zap_listener(lambda lo, hi: results.extend([fault(pvm, GPA), fault(pvm, GPA + P)]))
    pvm.set_user_memory_region(0, GPA, 0)
    assert isinstance(results[0], Retry) and isinstance(results[1], Mapped)
    assert pvm.introspect()["counters"]["retries"] == 1


def test_one_result_type_for_the_model_and_the_cpu(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """``SimVm.handle_fault`` (the CPU's ``cpu_types.GpaResolver``) hands the vCPU the model's own result
    objects: the CPU layer's names are the same types (``fault.py``), nothing is translated."""
    assert cpu_types.Mapped is Mapped and cpu_types.MemoryFault is MemoryFault
    assert cpu_types.Mmio is Mmio and cpu_types.Retry is Retry
    mem = hostmem(P)
    dvm.set_user_memory_region(0, 0, P, mem)
    assert isinstance(dvm, cpu_types.GpaResolver)
    assert dvm.handle_fault(0x10, False, False) == Mapped(mem.address, P, True, gpa=0, level=1)
    assert dvm.handle_fault(0x10, False, False) == Mapped(mem.address, P, True, gpa=0, level=1, spurious=True)
    assert dvm.handle_fault(1 << 30, True, False) == Mmio(1 << 30, write=True)


def _aligned_mem(hostmem: Callable[[int], HostMemory], size: int) -> memoryview:
    """A 2 MiB-aligned window of host memory (hva/gfn alignment matters for huge mappings, `hugepage_has_attrs`)."""
    mem = hostmem(size + M2)
    skip = -mem.address % M2
    return memoryview(mem)[skip : skip + size]


def test_3_6_shared_huge_only_where_uniform(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`hugepage_has_attrs`: shared mappings are 2 MiB where the region's attributes are uniform; converting one 4 KiB
    page makes that region "mixed" (4 KiB mappings); converting it back restores 2 MiB."""
    pvm.set_user_memory_region(0, GPA, 2 * M2, _aligned_mem(hostmem, 2 * M2))
    r = fault(pvm, GPA + 5 * P)
    assert isinstance(r, Mapped) and r.level == 2 and r.gpa == GPA
    pvm.set_memory_attributes(GPA + M2 + 7 * P, P, PRIVATE)
    assert pvm.introspect()["memslots"][0]["mixed"][2] == [(GPA // M2 + 1, GPA // M2 + 2)]
    r = fault(pvm, GPA + M2)
    assert isinstance(r, Mapped) and r.level == 1
    r = fault(pvm, GPA + 3 * P)
    assert isinstance(r, Mapped) and r.level == 2  # first region untouched, its SPTE survived? re-fault ok
    pvm.set_memory_attributes(GPA + M2 + 7 * P, P, 0)
    assert pvm.introspect()["memslots"][0]["mixed"][2] == []
    r = fault(pvm, GPA + M2 + 9 * P)
    assert isinstance(r, Mapped) and r.level == 2


def test_3_6_dirty_logging_and_misaligned_hva_4k(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`hugepage_has_attrs`: dirty logging, or an hva not congruent with the gfn, keeps mappings at 4 KiB."""
    win = _aligned_mem(hostmem, M2 + P)
    dvm.set_user_memory_region(0, 0, M2, win[P:])
    assert fault(dvm, 0).level == 1  # type: ignore[union-attr]
    dvm.set_user_memory_region(1, 1 << 30, M2, win[:M2], uapi.KVM_MEM_LOG_DIRTY_PAGES)
    assert fault(dvm, 1 << 30).level == 1  # type: ignore[union-attr]


def test_3_6_private_mappings_are_4k(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`hugepage_has_attrs`: upstream gmem reports order 0, so private mappings are 4 KiB even over a uniform 2 MiB."""
    with pvm.create_guest_memfd(M2) as g:
        pvm.set_user_memory_region2(0, GPA, M2, _aligned_mem(hostmem, M2), GMEM, g, 0)
        pvm.set_memory_attributes(GPA, M2, PRIVATE)
        assert fault(pvm, GPA).level == 1  # type: ignore[union-attr]


def test_5_6_hugepage_gmem(open_sim: Callable[..., SimSystem], hostmem: Callable[[int], HostMemory]) -> None:
    """the v12 RFC's KVM_GUEST_MEMFD_ALLOW_HUGEPAGE (sim option): 2 MiB folios, bind needs 2 MiB aligned offset and
    size, private mappings are 2 MiB where the folio is whole, unpoisoned and attributes uniform; else 4 KiB. A punch
    zaps the huge SPTE."""
    H = SIM_GUEST_MEMFD_FLAG_HUGEPAGE
    with open_sim(hugepage=True).create_vm(1) as vm, vm.create_guest_memfd(4 * M2, H) as g:
        region = vm.set_user_memory_region2
        with pytest.raises(OSError) as info:
            region(0, GPA, M2, None, GMEM, g, P)
        assert info.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            region(0, GPA, M2 + P, None, GMEM, g, 0)
        region(0, GPA, 2 * M2, None, GMEM, g, 0)
        vm.set_memory_attributes(GPA, 2 * M2, PRIVATE)
        r = vm.sim.handle_fault(GPA + 3 * P)
        assert isinstance(r, Mapped) and r.level == 2 and r.gpa == GPA
        assert g.introspect()["pages_present"] == 512
        ctypes.memset(r.host_ptr + P, 0x77, P)
        g.punch_hole(P, P)  # zaps the whole 2 MiB SPTE; the next fault re-allocates the folio
        assert vm.introspect()["sptes"] == []
        r = vm.sim.handle_fault(GPA + 3 * P)
        assert isinstance(r, Mapped) and r.level == 2
        assert ctypes.string_at(r.host_ptr + P, P) == bytes(P)
        g.inject_poison(5 * P)  # a poisoned page breaks the folio's uniformity
        r = vm.sim.handle_fault(GPA + 3 * P)
        assert isinstance(r, Mapped) and r.level == 1
        vm.set_memory_attributes(GPA + M2, P, 0)
        r = vm.sim.handle_fault(GPA + M2 + 8 * P)
        assert isinstance(r, Mapped) and r.level == 1
