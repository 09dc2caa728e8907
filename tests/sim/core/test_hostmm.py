"""The host mm's operations in the core (``core/hostmm.py``) on plain objects: no fd, no mapping, no unicorn.

inject_poison's offset (then ``kvm_gmem_error_folio``), madvise(MADV_REMOVE) (``do_madvise``, ``madvise_remove``),
which files the host may touch and the pages it faulted in (``kvm_gmem_fault_user_mapping``), and munmap under a
memslot (the mmu notifier).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import NullBacking, hostmm
from kvmgmem.backends.sim.core.gmem import PAGE_ABSENT, PAGE_HWPOISON, PAGE_PRESENT, GmemFile
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.backends.sim.fault import Mapped, MemoryFault
from kvmgmem.errors import KvmError

P = uapi.PAGE_SIZE
HVA = 0x7F0000000000


@pytest.fixture
def file(vm: VmCore) -> Iterator[GmemFile]:
    f = vm.create_guest_memfd(8 * P, uapi.GUEST_MEMFD_FLAG_MMAP, lambda size: NullBacking())
    yield f
    f.put()


def failure(fn: Callable[[], object], op: str) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    assert info.value.op == op
    return info.value.errno


def states(file: GmemFile) -> list[int]:
    return [file.inode.state(i) for i in range(file.inode.npages)]


def test_only_an_init_shared_file_is_touchable_by_the_host(vm: VmCore, file: GmemFile) -> None:
    shared = vm.create_guest_memfd(P, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED, NullBacking)
    assert hostmm.host_may_touch(shared) and not hostmm.host_may_touch(file)
    shared.put()


def test_memory_failure_offset(file: GmemFile) -> None:
    for offset in (1 << 63, (1 << 64) - 1):  # negative as a loff_t
        assert failure(lambda o=offset: hostmm.memory_failure(file, o), "inject_poison") == errno.EINVAL
    assert failure(lambda: hostmm.memory_failure(file, 8 * P), "inject_poison") == errno.EINVAL  # past EOF
    assert PAGE_HWPOISON not in states(file)
    hostmm.memory_failure(file, 3 * P + 17)  # the page holding the byte
    assert states(file)[3] == PAGE_HWPOISON and states(file).count(PAGE_HWPOISON) == 1


def test_madvise_remove_alignment_and_range(file: GmemFile) -> None:
    file.vm.gmem_fallocate(file, uapi.FALLOC_FL_KEEP_SIZE, 0, 8 * P)
    assert states(file) == [PAGE_PRESENT] * 8
    assert failure(lambda: hostmm.madvise_remove(file, 0, 8 * P, P + 1, P), "madvise") == errno.EINVAL
    hostmm.madvise_remove(file, 2 * P, 4 * P, P, 1)  # a mapping of file pages 2..5: the length rounds up
    assert states(file) == [PAGE_PRESENT] * 3 + [PAGE_ABSENT] + [PAGE_PRESENT] * 4
    hostmm.madvise_remove(file, 2 * P, 4 * P, 2 * P, 100 * P)  # kept inside the mapping
    assert states(file) == [PAGE_PRESENT] * 3 + [PAGE_ABSENT] * 3 + [PAGE_PRESENT] * 2
    hostmm.madvise_remove(file, 0, 8 * P, 0, 0)  # length 0: nothing
    assert states(file).count(PAGE_PRESENT) == 5


def test_user_faults_allocate_unless_the_inode_died(vm: VmCore) -> None:
    f = vm.create_guest_memfd(8 * P, uapi.GUEST_MEMFD_FLAG_MMAP, lambda size: NullBacking())
    hostmm.user_faults(f, lambda: [(1, 3), (6, 7)])
    assert states(f) == [0, 1, 1, 0, 0, 0, 1, 0]
    assert f.inode.pages_allocated == 3
    inode = f.inode
    f.put()
    assert not inode.alive
    hostmm.user_faults(f, lambda: [(0, 8)])
    assert inode.nr_present == 0


def test_munmap_under_a_memslot_trims_what_it_may_reach(vm: VmCore) -> None:
    vm.set_user_memory_region(
        v2=True, slot=0, flags=0, guest_phys_addr=0, memory_size=8 * P, userspace_addr=HVA, hva_live=(HVA, HVA + 8 * P)
    )
    assert isinstance(vm.handle_fault(4 * P), Mapped)
    slot = next(iter(vm.memslots[0]))
    hostmm.mmu_notifier_invalidate(vm, HVA + 6 * P, HVA + 7 * P, unmap=False)  # MADV_DONTNEED: zap only
    assert slot.hva_live == (HVA, HVA + 8 * P)
    hostmm.mmu_notifier_invalidate(vm, HVA + 4 * P, HVA + 5 * P, unmap=True)  # a hole: the part below stays
    assert slot.hva_live == (HVA, HVA + 4 * P)
    assert isinstance(vm.handle_fault(3 * P), Mapped)
    for gpa in (4 * P, 6 * P):  # the unmapped page (its SPTE zapped), and one above the hole, never mapped
        result = vm.handle_fault(gpa)
        assert isinstance(result, MemoryFault) and result.errno == errno.EFAULT, result
    hostmm.mmu_notifier_invalidate(vm, HVA - P, HVA + P, unmap=True)  # the start: the part above stays
    assert slot.hva_live == (HVA + P, HVA + 4 * P)
    hostmm.mmu_notifier_invalidate(vm, HVA, HVA + 8 * P, unmap=True)
    assert slot.hva_live is None
