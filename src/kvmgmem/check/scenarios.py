"""The scenarios: small model states with a few threads racing on one gfn or one 2 MiB region.

Why so small: every schedule is re-executed from scratch, and the historic races need only one or two
faults against one writer (Documentation/virt/kvm/locking.rst and the commits named in ``bugs``). Each
scenario builds a fresh SW_PROTECTED VM (7.2 profile) with ``ContentBacking`` guest_memfd storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmgmem import uapi
from kvmgmem.backends.sim.core.gmem import GmemFile
from kvmgmem.backends.sim.core.profile import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, get_profile
from kvmgmem.backends.sim.core.steps import (
    BUG_ATTR_BEFORE_SNAPSHOT,
    BUG_ATTR_NO_RANGE_ADD,
    BUG_GMEM_START_UNCONDITIONAL,
    BUG_INVALID_SLOT_AS_NO_SLOT,
    BUG_NO_HUGEPAGE_HEAD_TAIL,
    BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP,
    BUG_PUNCH_NO_TRUNCATE,
    BUG_SKIP_SHARED_ONLY_SLOTS,
    BUG_UNBIND_SKIPS_DYING_FILE,
)
from kvmgmem.backends.sim.core.vm import VmCore, create_vm

from .world import (
    ContentBacking,
    World,
    allocate_op,
    close_op,
    create_slot_op,
    delete_slot_op,
    fault_op,
    hva_invalidate_op,
    move_slot_op,
    punch_op,
    set_attributes_op,
)

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
BASE_GFN = 0x100000  # 4 GiB
HVA = 0x7F0000000000
HUGE = 512  # pages in 2 MiB
GUEST_DATA = 0xAA


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    build: Callable[[frozenset[str]], World]
    exposes: tuple[str, ...]  # historic bugs this scenario finds


def _vm(name: str, bugs: frozenset[str], hugepage: bool = False) -> VmCore:
    vm = create_vm(get_profile("7.2").with_options(hugepage=hugepage), uapi.KVM_X86_SW_PROTECTED_VM)
    vm.name = vm.slots_klock.owner = vm.mmu.klock.owner = name
    vm.bugs = bugs
    return vm


def _gmem(vm: VmCore, npages: int, hugepage: bool = False) -> tuple[GmemFile, ContentBacking]:
    backing = ContentBacking(0x7E0000000000)
    flags = SIM_GUEST_MEMFD_FLAG_HUGEPAGE if hugepage else 0
    file = vm.create_guest_memfd(npages * uapi.PAGE_SIZE, flags, lambda size: backing)
    assert file.inode.invalidate_lock is not None
    file.inode.invalidate_lock.owner = "gmem"
    return file, backing


def _slot(vm: VmCore, slot: int, gfn: int, npages: int, file: GmemFile | None = None, pgoff: int = 0) -> None:
    size = npages * uapi.PAGE_SIZE
    hva = HVA + slot * (1 << 30)
    vm.set_user_memory_region(
        v2=True,
        slot=slot,
        flags=uapi.KVM_MEM_GUEST_MEMFD if file else 0,
        guest_phys_addr=gfn << 12,
        memory_size=size,
        userspace_addr=hva,
        guest_memfd=3 if file else -1,
        guest_memfd_offset=pgoff * uapi.PAGE_SIZE,
        hva_live=(hva, hva + size),
        fd_lookup=(lambda fd: file) if file else None,
    )


def _private(vm: VmCore, gfn: int, npages: int) -> None:
    vm.set_memory_attributes(gfn << 12, npages * uapi.PAGE_SIZE, PRIVATE, 0)


def attr_huge(bugs: frozenset[str]) -> World:
    """Two vCPUs fault gfns A and B of one private 2 MiB huge folio while A alone converts to shared."""
    vm = _vm("vm1", bugs, hugepage=True)
    file, _ = _gmem(vm, HUGE, hugepage=True)
    _slot(vm, 0, BASE_GFN, HUGE, file)
    _private(vm, BASE_GFN, HUGE)
    file.inode.materialise(0, HUGE)
    a, b = BASE_GFN, BASE_GFN + 1
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, b)),
            ("vcpu1", fault_op(vm, a)),
            ("vmm", set_attributes_op(vm, a, 1, 0)),
        ],
    )


def punch_release(bugs: frozenset[str]) -> World:
    """A vCPU faults private page 0 while the VMM punches it and another thread closes the guest_memfd."""
    vm = _vm("vm1", bugs)
    file, backing = _gmem(vm, 2)
    _slot(vm, 0, BASE_GFN, 2, file)
    _private(vm, BASE_GFN, 2)
    file.inode.materialise(0, 1)
    backing.data[0] = GUEST_DATA
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, BASE_GFN)),
            ("punch", punch_op(vm, file, backing, 0, 1)),
            ("close", close_op(vm, file)),
        ],
    )


def fault_delete(bugs: frozenset[str]) -> World:
    """Two vCPUs fault shared gfns of a guest_memfd memslot while the VMM deletes it."""
    vm = _vm("vm1", bugs)
    file, _ = _gmem(vm, 2)
    _slot(vm, 0, BASE_GFN, 2, file)
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, BASE_GFN)),
            ("vcpu1", fault_op(vm, BASE_GFN + 1)),
            ("vmm", delete_slot_op(vm, 0)),
        ],
    )


def two_vms(bugs: frozenset[str]) -> World:
    """One guest_memfd inode bound into two VMs (kvm_gmem_punch_hole begins in each, truncates once, then
    ends in each): a vCPU of each VM faults page 0 while the VMM punches it."""
    vm1, vm2 = _vm("vm1", bugs), _vm("vm2", bugs)
    file1, backing = _gmem(vm1, 2)
    file2 = GmemFile(file1.inode, vm2)
    vm2.gmem_files.append(file2)
    _slot(vm1, 0, BASE_GFN, 2, file1)
    _slot(vm2, 0, BASE_GFN, 2, file2)
    _private(vm1, BASE_GFN, 2)
    _private(vm2, BASE_GFN, 2)
    file1.inode.materialise(0, 1)
    backing.data[0] = GUEST_DATA
    return World(
        [vm1, vm2],
        [
            ("vm1.vcpu0", fault_op(vm1, BASE_GFN)),
            ("vm2.vcpu0", fault_op(vm2, BASE_GFN)),
            ("punch", punch_op(vm1, file1, backing, 0, 1)),
        ],
    )


def release_delete(bugs: frozenset[str]) -> World:
    """The last close() of a guest_memfd races the deletion of the memslot bound to it (syzbot's UAF)."""
    vm = _vm("vm1", bugs)
    file, _ = _gmem(vm, 2)
    _slot(vm, 0, BASE_GFN, 2, file)
    return World(
        [vm],
        [
            ("close", close_op(vm, file)),
            ("vmm", delete_slot_op(vm, 0)),
        ],
    )


def punch_unbound(bugs: frozenset[str]) -> World:
    """A vCPU faults bound page 0 while the VMM punches page 1, which no memslot binds."""
    vm = _vm("vm1", bugs)
    file, backing = _gmem(vm, 2)
    _slot(vm, 0, BASE_GFN, 1, file)
    _private(vm, BASE_GFN, 1)
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, BASE_GFN)),
            ("punch", punch_op(vm, file, backing, 1, 2)),
        ],
    )


def shared_slot_convert(bugs: frozenset[str]) -> World:
    """A vCPU maps a gfn of a plain (shared-only) memslot while the VMM converts it to private."""
    vm = _vm("vm1", bugs)
    _slot(vm, 1, BASE_GFN, 1)
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, BASE_GFN)),
            ("vmm", set_attributes_op(vm, BASE_GFN, 1, PRIVATE)),
        ],
    )


def fault_convert(bugs: frozenset[str]) -> World:
    """A vCPU faults a shared gfn of a guest_memfd memslot while the VMM converts it to private."""
    vm = _vm("vm1", bugs)
    file, _ = _gmem(vm, 1)
    _slot(vm, 0, BASE_GFN, 1, file)
    return World(
        [vm],
        [
            ("vcpu0", fault_op(vm, BASE_GFN)),
            ("vmm", set_attributes_op(vm, BASE_GFN, 1, PRIVATE)),
        ],
    )


def notifier_create(bugs: frozenset[str]) -> World:
    """The host invalidates memory (mm notifier start ... end) while the VMM creates a memslot over it and a
    vCPU touches the new gfn."""
    vm = _vm("vm1", bugs)
    hva = HVA + (1 << 30)
    return World([vm], [
        ("mm", hva_invalidate_op(vm, hva, uapi.PAGE_SIZE)),
        ("vmm", create_slot_op(vm, 1, BASE_GFN, 1, hva)),
        ("vcpu0", fault_op(vm, BASE_GFN)),
    ])  # fmt: skip


def fault_move(bugs: frozenset[str]) -> World:
    """A vCPU faults a gfn of a plain memslot while the VMM moves the memslot elsewhere and the host
    invalidates its memory."""
    vm = _vm("vm1", bugs)
    _slot(vm, 1, BASE_GFN, 1)
    return World([vm], [
        ("vcpu0", fault_op(vm, BASE_GFN)),
        ("vmm", move_slot_op(vm, 1, BASE_GFN + 0x10)),
        ("mm", hva_invalidate_op(vm, HVA + (1 << 30), uapi.PAGE_SIZE)),
    ])  # fmt: skip


def alloc_punch(bugs: frozenset[str]) -> World:
    """A vCPU faults private page 0 while the VMM allocates pages 0-1 and punches page 0."""
    vm = _vm("vm1", bugs)
    file, backing = _gmem(vm, 2)
    _slot(vm, 0, BASE_GFN, 2, file)
    _private(vm, BASE_GFN, 2)
    return World([vm], [
        ("vcpu0", fault_op(vm, BASE_GFN)),
        ("alloc", allocate_op(vm, file, 0, 2)),
        ("punch", punch_op(vm, file, backing, 0, 1)),
    ])  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("attr_huge", attr_huge.__doc__ or "", attr_huge, (BUG_NO_HUGEPAGE_HEAD_TAIL, BUG_ATTR_NO_RANGE_ADD)),
        Scenario("punch_release", punch_release.__doc__ or "", punch_release, (BUG_PUNCH_NO_TRUNCATE,)),
        Scenario("fault_delete", fault_delete.__doc__ or "", fault_delete, (BUG_INVALID_SLOT_AS_NO_SLOT,)),
        Scenario("two_vms", two_vms.__doc__ or "", two_vms, (BUG_PUNCH_NO_TRUNCATE,)),
        Scenario("release_delete", release_delete.__doc__ or "", release_delete, (BUG_UNBIND_SKIPS_DYING_FILE,)),
        Scenario("punch_unbound", punch_unbound.__doc__ or "", punch_unbound, (BUG_GMEM_START_UNCONDITIONAL,)),
        Scenario(
            "shared_slot_convert", shared_slot_convert.__doc__ or "", shared_slot_convert, (BUG_SKIP_SHARED_ONLY_SLOTS,)
        ),
        Scenario("fault_convert", fault_convert.__doc__ or "", fault_convert, (BUG_ATTR_BEFORE_SNAPSHOT,)),
        Scenario(
            "notifier_create", notifier_create.__doc__ or "", notifier_create, (BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP,)
        ),
        Scenario("fault_move", fault_move.__doc__ or "", fault_move, ()),
        Scenario("alloc_punch", alloc_punch.__doc__ or "", alloc_punch, ()),
    )
}
