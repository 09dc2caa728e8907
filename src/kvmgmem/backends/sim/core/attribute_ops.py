"""KVM_SET_MEMORY_ATTRIBUTES of one VM: ``kvm_vm_ioctl_set_mem_attributes`` → ``kvm_vm_set_mem_attributes``
(``virt/kvm/kvm_main.c``) with the x86 hooks around the store (``kvm_arch_pre_set_memory_attributes``,
``kvm_arch_post_set_memory_attributes``), as kernel-step generators.

Why this order: every SPTE of the range is zapped and the TLBs flushed *before* the new attributes are stored,
and the invalidation stays open until the huge-page "mixed" bits are recomputed, so no fault can map a gfn with
the access type it is leaving, nor map a region huge that the change is splitting. A change that stores what is
already there zaps nothing. The argument checks are ``attributes.validate``; the map is ``VmCore.attributes``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from . import attributes as attrs
from .caps import supported_attributes
from .lpage import head_tail_regions, update_mixed
from .steps import (
    BUG_ATTR_NO_RANGE_ADD,
    BUG_NO_HUGEPAGE_HEAD_TAIL,
    BUG_SKIP_SHARED_ONLY_SLOTS,
    Step,
    Steps,
    run_steps,
)

if TYPE_CHECKING:
    from .vm import VmCore


class AttributeOps:
    """The memory-attributes ioctl of one VM."""

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int) -> None:
        """``kvm_vm_ioctl_set_mem_attributes``: ENOTTY without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES, the
        argument checks, then the change."""
        vm = self.vm
        if not vm.profile.sw_protected:
            raise KvmError(errno.ENOTTY, attrs.OP, "memory attributes are not compiled into this kernel")
        start, end = attrs.validate(address, size, attributes, flags, supported_attributes(vm.profile, vm))
        run_steps(self.set_memory_attributes_steps(start, end, attributes))

    def set_memory_attributes_steps(self, start: int, end: int, attributes: int) -> Steps[None]:
        """kvm_vm_set_mem_attributes on gfns ``[start, end)`` (arguments already validated)."""
        vm = self.vm
        mmu = vm.mmu
        yield Step("kvm_vm_set_mem_attributes: mutex_lock(slots_lock)", take=(vm.slots_klock,))
        if vm.attributes.has(start, end, attributes):
            yield Step("mutex_unlock(slots_lock): unchanged", drop=(vm.slots_klock,))
            return  # 7. no-op: no zap
        touched = [s for space in vm.memslots for s in space.overlapping(start, end)]
        pre = [s for s in touched if s.as_id == 0]
        ranges = [(max(start, s.base_gfn), min(end, s.end_gfn)) for s in pre]
        if pre:
            # pre pass: the first overlapping slot takes mmu_lock and begins the invalidation
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_begin; kvm_arch_pre_set_memory_attributes: range_add, "
                       "unmap", take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_begin()
            going_private = bool(attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            for s, (lo, hi) in zip(pre, ranges, strict=True):
                if BUG_ATTR_NO_RANGE_ADD not in vm.bugs:
                    mmu.invalidate_range_add(lo, hi)
                    if BUG_NO_HUGEPAGE_HEAD_TAIL not in vm.bugs:
                        for a, b in head_tail_regions(s, lo, hi):
                            mmu.invalidate_range_add(a, b)
                if going_private and not s.can_be_private and BUG_SKIP_SHARED_ONLY_SLOTS in vm.bugs:
                    continue
                mmu.zap(lo, hi)
            yield Step("kvm_flush_remote_tlbs; KVM_MMU_UNLOCK")
            mmu.notify_zaps(ranges)
        yield Step("xa_store: store the attributes", guard=mmu.klock)
        vm.mutating("attributes", start, end)
        vm.attributes.store(start, end, attributes)
        if pre:
            # post pass: end the invalidation and recompute "mixed" in the same mmu_lock hold
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; kvm_arch_post_set_memory_attributes; KVM_MMU_UNLOCK",
                       take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_end()
            for s in touched:
                update_mixed(s, vm.attributes, start, end)
        else:
            yield Step("recompute mixed", guard=mmu.klock)
            for s in touched:
                update_mixed(s, vm.attributes, start, end)
        yield Step("mutex_unlock(slots_lock)", drop=(vm.slots_klock,))
