"""The core's memslot updates and guest_memfd fallocate are dispatchers, as in the kernel: the kind of memslot
change (``enum kvm_mr_change``) is computed once and ``kvm_set_memslot`` runs that kind's sequence;
``kvm_gmem_fallocate`` hands off to punch-hole or allocate. Plain objects: no fd, no host memory, no unicorn."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import NullBacking
from kvmgmem.backends.sim.core.memslots import MemslotChange
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.backends.sim.fault import Mapped, Retry
from kvmgmem.errors import KvmError

P = uapi.PAGE_SIZE
LOG_DIRTY = uapi.KVM_MEM_LOG_DIRTY_PAGES
KEEP, PUNCH = uapi.FALLOC_FL_KEEP_SIZE, uapi.FALLOC_FL_PUNCH_HOLE
HVA = 0x7F0000000000


def _changes(vm: VmCore) -> list[MemslotChange]:
    """Record the kind every ``kvm_set_memslot`` (``MemslotOps.set_memslot_steps``) call runs."""
    seen: list[MemslotChange] = []
    ops = vm.memslot_ops
    run = ops.set_memslot_steps

    def spy(*args: Any) -> Any:
        seen.append(args[3])
        return run(*args)

    ops.set_memslot_steps = spy  # type: ignore[method-assign]
    return seen


def _region(vm: VmCore, gpa: int, size: int, flags: int = 0) -> None:
    live = (HVA, HVA + 4 * P)
    vm.set_user_memory_region(
        v2=True, slot=1, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=HVA, hva_live=live
    )


def test_each_kind_runs_its_own_sequence(vm: VmCore) -> None:
    seen = _changes(vm)
    _region(vm, 1 << 30, 4 * P)
    _region(vm, 1 << 30, 4 * P)  # nothing changes: no sequence at all
    _region(vm, 1 << 31, 4 * P)
    _region(vm, 1 << 31, 4 * P, LOG_DIRTY)
    _region(vm, 1 << 31, 0)
    C = MemslotChange
    assert seen == [C.CREATE, C.MOVE, C.FLAGS_ONLY, C.DELETE]
    assert vm.memslots[0].get(1) is None


def test_move_and_flags_only_zap_the_old_slot_create_zaps_nothing(vm: VmCore) -> None:
    vm.enable_cap(uapi.KVM_CAP_DISABLE_QUIRKS2, 0, (uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL, 0, 0, 0))  # else: zap all
    zaps: list[tuple[int, int]] = []
    vm.add_zap_listener(lambda a, b: zaps.append((a, b)))
    gfn = (1 << 30) >> uapi.PAGE_SHIFT
    _region(vm, 1 << 30, 4 * P)
    assert zaps == []
    _region(vm, 1 << 30, 4 * P, LOG_DIRTY)
    _region(vm, 1 << 31, 4 * P, LOG_DIRTY)
    _region(vm, 1 << 31, 0, LOG_DIRTY)
    gfn2 = (1 << 31) >> uapi.PAGE_SHIFT
    assert zaps == [(gfn, gfn + 4), (gfn, gfn + 4), (gfn2, gfn2 + 4)]


def test_delete_of_a_missing_slot_and_forbidden_modifications(vm: VmCore) -> None:
    seen = _changes(vm)
    with pytest.raises(KvmError) as e:
        _region(vm, 0, 0)
    assert e.value.errno == errno.EINVAL and "does not exist" in str(e.value)
    _region(vm, 0, 4 * P)
    with pytest.raises(KvmError) as e:
        _region(vm, 0, 4 * P, uapi.KVM_MEM_READONLY)  # READONLY toggled
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KvmError) as e:
        _region(vm, 0, 2 * P)  # size changed
    assert e.value.errno == errno.EINVAL
    assert seen == [MemslotChange.CREATE]


def test_fallocate_dispatches_to_allocate_and_punch(vm: VmCore) -> None:
    file = vm.create_guest_memfd(4 * P, 0, lambda size: NullBacking())
    punched: list[tuple[int, int]] = []
    ops = vm.gmem_ops
    punch = ops.punch

    def spy(f: Any, first: int, last: int) -> None:
        punched.append((first, last))
        punch(f, first, last)

    ops.punch = spy  # type: ignore[method-assign]
    try:
        vm.gmem_fallocate(file, KEEP, 0, 4 * P)
        assert file.inode.nr_present == 4 and punched == []
        vm.gmem_fallocate(file, KEEP | PUNCH, P, 2 * P)
        assert file.inode.nr_present == 2 and punched == [(1, 3)]
        vm.gmem_fallocate(file, KEEP | PUNCH, 4 * P, P)  # punching at EOF: no bounds check
        assert punched[-1] == (4, 5)
        with pytest.raises(KvmError) as e:
            vm.gmem_fallocate(file, KEEP, 3 * P, 2 * P)  # allocating past EOF
        assert e.value.errno == errno.EINVAL and file.inode.nr_present == 2
    finally:
        file.put()


def test_a_fault_on_a_slot_being_deleted_or_moved_retries_and_says_so(vm: VmCore) -> None:
    """``kvm_invalidate_memslot``'s window: a fault on the INVALID slot retries (a prefault would give EAGAIN)."""
    _region(vm, 1 << 30, 4 * P)
    slot = vm.memslots[0].get(1)
    assert slot is not None
    slot.invalid = True  # what the delete publishes before it drains SRCU and zaps
    assert vm.handle_fault(1 << 30) == Retry("memslot is being deleted or moved", invalid_slot=True)
    slot.invalid = False
    assert isinstance(vm.handle_fault(1 << 30), Mapped)
