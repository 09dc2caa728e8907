"""The VM's mmu notifier (``virt/kvm/kvm_main.c``): ``kvm_mmu_notifier_invalidate_range_start``/``_end``
around a host change of the memory behind a memslot's userspace range (munmap, migration, THP split).

Why it has state of its own: both callbacks decide *at that moment* whether a memslot overlaps the range, so
a memslot published between them could see an end without its begin; ``kvm_swap_active_memslots`` therefore
waits for ``mn_active_invalidate_count`` (``active_invalidate_count`` here) to drop to zero before publishing
(``MemslotOps._swap`` waits on :meth:`MmuNotifier.idle`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmgmem import uapi

from .steps import Step, Steps

if TYPE_CHECKING:
    from .vm import VmCore


class MmuNotifier:
    """``kvm->mmu_notifier`` of one VM and its invalidations in flight."""

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm
        #: mm-notifier invalidations between range_start and range_end (kvm->mn_active_invalidate_count).
        self.active_invalidate_count = 0

    def idle(self) -> bool:
        """No invalidation is between range_start and range_end (what a memslot swap waits for)."""
        return self.active_invalidate_count == 0

    def _gfn_ranges(self, hva_start: int, hva_end: int) -> list[tuple[int, int]]:
        """gfn ranges of the address-space-0 memslots whose userspace range meets ``[hva_start, hva_end)``."""
        out = []
        for s in self.vm.memslots[0]:
            lo = max(hva_start, s.userspace_addr)
            hi = min(hva_end, s.userspace_addr + s.npages * uapi.PAGE_SIZE)
            if lo < hi:
                first = s.base_gfn + (lo - s.userspace_addr) // uapi.PAGE_SIZE
                last = s.base_gfn + -(-(hi - s.userspace_addr) // uapi.PAGE_SIZE)
                out.append((first, last))
        return out

    def invalidate_steps(self, hva_start: int, hva_end: int) -> Steps[None]:
        """kvm_mmu_notifier_invalidate_range_start / _end around a host change of ``[hva_start, hva_end)``.
        Both callbacks take mmu_lock and begin/end only if a memslot overlaps *at that moment*. Only the
        shared (hva-backed) side is affected (KVM_FILTER_SHARED)."""
        vm = self.vm
        mmu = vm.mmu
        yield Step("kvm_mmu_notifier_invalidate_range_start: mn_active_invalidate_count++")
        self.active_invalidate_count += 1
        ranges = self._gfn_ranges(hva_start, hva_end)
        if ranges:
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_begin; kvm_unmap_gfn_range (KVM_FILTER_SHARED)",
                       take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_begin()
            for lo, hi in ranges:
                mmu.invalidate_range_add(lo, hi)
                for spte in [s for s in mmu.overlapping(lo, hi) if s.gmem is None]:
                    mmu.zap(spte.gfn, spte.end_gfn)
            yield Step("kvm_flush_remote_tlbs")
            mmu.notify_zaps(ranges)
        yield Step("the host changes the pages behind the hva range")
        for lo, hi in self._gfn_ranges(hva_start, hva_end):
            vm.mutating("hva", lo, hi)
        yield Step("kvm_mmu_notifier_invalidate_range_end")
        if self._gfn_ranges(hva_start, hva_end):
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(mmu.klock,), drop=(mmu.klock,))
            mmu.invalidate_end()
        yield Step("mn_active_invalidate_count--; rcuwait_wake_up(&kvm->mn_memslots_update_rcuwait)")
        self.active_invalidate_count -= 1
