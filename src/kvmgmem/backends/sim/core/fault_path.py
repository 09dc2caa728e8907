"""The TDP page fault of one VM: ``kvm_mmu_page_fault`` → ``kvm_mmu_faultin_pfn`` → ``kvm_tdp_mmu_map``
(``arch/x86/kvm/mmu/mmu.c``), with the mapping-level rules (``kvm_mmu_max_mapping_level``,
``hugepage_has_attrs``; the v12 RFC's huge-page guest_memfd flag).

Why apart from the invalidation protocol (``core/mmu.py``) and the SPTE map (``core/spte_map.py``): the fault is
the *reader* of both — it snapshots ``mmu_invalidate_seq``, resolves the pfn without ``mmu_lock``, then re-checks
with ``mmu_invalidate_retry_gfn`` and installs under it — and it is the sim's hot path (one call per TLB fill),
so it is kept in one place where its cost can be read line by line. The outcomes are the CPU contract in
``core/mmu.py``.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmgmem import uapi

from ..fault import FaultResult, Mapped, MemoryFault, Mmio, Retry
from .gmem import PAGE_ABSENT, PAGE_HWPOISON, PAGE_PRESENT, GmemInode
from .memslots import Memslot
from .profile import PG_LEVEL_4K, level_pages
from .spte_map import UNKNOWN, Spte
from .steps import BUG_ATTR_BEFORE_SNAPSHOT, BUG_INVALID_SLOT_AS_NO_SLOT, Step, Steps

if TYPE_CHECKING:
    from .mmu import Mmu
    from .vm import VmCore

_PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
_GUEST_MEMFD = uapi.KVM_MEM_GUEST_MEMFD
_READONLY = uapi.KVM_MEM_READONLY
_PAGE_SIZE = uapi.PAGE_SIZE
_PAGE_SHIFT = uapi.PAGE_SHIFT


class FaultPath:
    """The fault of one VM's MMU, straight through (``fault``) or one kernel step at a time (``fault_steps``)."""

    def __init__(self, vm: VmCore, mmu: Mmu) -> None:
        self.vm = vm
        self.mmu = mmu
        self.lock = mmu.lock
        self.spte_map = mmu.spte_map
        self.counters = mmu.counters
        self._result: FaultResult | None = None
        # The fault's steps, built once (the normal path yields them on every fault).
        self.step_entry = Step("F1-F3 kvm_mmu_page_fault: attribute, fast_page_fault; srcu_read_lock, gfn_to_memslot")
        self._step_snapshot = Step("F4 kvm_mmu_faultin_pfn: mmu_seq = mmu_invalidate_seq; smp_rmb()")
        self._step_checks = Step("F5-F7 kvm_mmu_faultin_pfn: slot validity, private vs shared")
        self._step_pfn = Step("F8 __kvm_mmu_faultin_pfn (kvm_gmem_get_pfn / hva)")
        self._step_map = Step("F10-F13 read_lock(mmu_lock); is_page_fault_stale; kvm_tdp_mmu_map; unlock",
                              take=(mmu.klock,), drop=(mmu.klock,), read=True)  # fmt: skip

    def fault(self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None) -> FaultResult:
        """Resolve a guest access to ``gpa`` (see ``core/mmu.py`` for the outcomes): ``fault_steps`` run
        whole under ``lock``, so on the sim's threads a fault is atomic with respect to writers."""
        gen = self._fault(gpa, write, private, False)
        with self.lock:
            for _ in gen:  # stepping off: runs to completion without stopping
                pass
            return self._result  # type: ignore[return-value]

    def fault_steps(
        self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None
    ) -> Steps[FaultResult]:
        """The TDP fault, F1..F13 of kvm_mmu_page_fault, one ``Step`` per kernel step. Every input of the
        mapping decision is read after the F4 snapshot, and the install re-checks it under mmu_lock."""
        return (yield from self._fault(gpa, write, private, True))

    def _done(self, result: FaultResult) -> FaultResult:
        self._result = result
        return result

    def _fault(self, gpa: int, write: bool, private: bool | None, stepping: bool) -> Steps[FaultResult]:
        """The fault's code. ``stepping`` makes it stop at each kernel step (the checker); the sim's normal
        path holds mmu_lock around the whole fault, so it runs the same code straight through (a generator
        resumed at every step would cost more than a fault's lookups)."""
        gfn = gpa >> uapi.PAGE_SHIFT
        vm, mmu, spte_map = self.vm, self.mmu, self.spte_map
        c = self.counters
        if stepping:
            yield self.step_entry
        # F1 (SW_PROTECTED: private from the current attribute), F3 fast_page_fault
        c.faults += 1
        f1_private = vm.attributes.get(gfn) & _PRIVATE != 0
        existing = spte_map.lookup(gfn)
        # An SPTE exists only while the attribute still says what it was installed for (every attribute
        # change zaps first), so a reported access type matching it is spurious too.
        if (
            existing is not None
            and (private is None or existing.private == bool(private))
            and (existing.writable or not write)
        ):
            c.spurious += 1
            return self._done(self._mapped(existing, spurious=True))
        is_private = f1_private if private is None else bool(private)
        # F2 kvm_vcpu_gfn_to_memslot, inside the vCPU's SRCU read section (counted for the checker's
        # synchronize_srcu; run straight through under mmu_lock, no memslot update can wait on this fault)
        if stepping:
            vm.srcu_readers += 1
        try:
            slot = vm.memslots[0].lookup(gfn)
            if stepping:
                yield self._step_snapshot
            mmu_seq = mmu.seq  # F4 fault->mmu_seq = mmu_invalidate_seq; smp_rmb()
            if stepping:
                yield self._step_checks
            # F6 slot being deleted or moved
            if slot is not None and slot.invalid:
                if BUG_INVALID_SLOT_AS_NO_SLOT not in vm.bugs:
                    return self._done(self._retry("memslot is being deleted or moved", invalid_slot=True))
                slot = None
            # F5 access type vs the attribute, re-read after the snapshot
            # (run straight through under mmu_lock nothing can have changed since F1, so no second lookup)
            attr_private = f1_private
            if stepping and BUG_ATTR_BEFORE_SNAPSHOT not in vm.bugs:
                attr_private = vm.attributes.is_private(gfn)
            if is_private != attr_private:
                return self._done(self._exit(gfn, is_private, errno.EFAULT))
            if stepping:
                yield self._step_pfn
            # F8 __kvm_mmu_faultin_pfn: kvm_gmem_get_pfn (the folio and its host address) or the hva
            pfn: tuple[GmemInode, int] | _Hva | FaultResult
            if is_private or (slot is not None and slot.gmem_only):
                pfn = self._gmem(gfn, slot, is_private, write)
            else:
                pfn = self._hva(gfn, slot, write)
            if type(pfn) is not tuple and pfn is not _HVA:
                return self._done(pfn)  # type: ignore[arg-type]
            assert slot is not None
            if stepping:
                yield self._step_map
            # F11 is_page_fault_stale: mmu_invalidate_retry_gfn under mmu_lock
            if mmu.seq != mmu_seq or (mmu.in_progress and mmu.retry_gfn(mmu_seq, gfn)):
                return self._done(self._retry("invalidation in progress"))
            # F12 kvm_tdp_mmu_map: the level is decided under the lock (lpage_info "mixed")
            if type(pfn) is tuple:
                spte = self._gmem_spte(gfn, slot, pfn[0], pfn[1], is_private)
            else:
                spte = self._hva_spte(gfn, slot, is_private)
            # Straight through, mmu_lock was held since F3, so its lookup still holds; stepping, it may not.
            spte_map.install(spte, UNKNOWN if stepping else existing)
            c.mapped += 1
            if spte.level == PG_LEVEL_4K:  # what _mapped builds, for the common case
                result = Mapped(spte.host_address, _PAGE_SIZE, spte.writable, gfn << _PAGE_SHIFT, 1, type(pfn) is tuple)
                self._result = result
                return result
            c.huge_mappings += 1
            return self._done(self._mapped(spte))
        finally:
            if stepping:
                vm.srcu_readers -= 1

    def _mapped(self, s: Spte, spurious: bool = False) -> Mapped:
        # positional, in Mapped's field order (host_ptr, size, writable, gpa, level, gmem, spurious): once per fault
        level = s.level
        size = uapi.PAGE_SIZE << (9 * (level - 1))
        return Mapped(s.host_address, size, s.writable, s.gfn << uapi.PAGE_SHIFT, level, s.gmem is not None, spurious)

    def _retry(self, why: str, invalid_slot: bool = False) -> Retry:
        self.counters.retries += 1
        return Retry(why, invalid_slot)

    def _exit(self, gfn: int, private: bool, err: int) -> MemoryFault:
        self.counters.memory_fault_exits += 1
        flags = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0
        return MemoryFault(flags=flags, gpa=gfn << uapi.PAGE_SHIFT, size=uapi.PAGE_SIZE, errno=err)

    def _gmem(self, gfn: int, slot: Memslot | None, private: bool, write: bool) -> tuple[GmemInode, int] | FaultResult:
        """F8 kvm_gmem_get_pfn: file, binding, folio (allocated and zeroed on first use), poison. Returns the
        folio's inode and the page's host address (the pfn)."""
        # 3a. no slot, or not a GUEST_MEMFD slot
        if slot is None or not slot.flags & _GUEST_MEMFD:
            return self._exit(gfn, private, errno.EFAULT)
        file = slot.gmem
        # 3b. kvm_gmem_get_pfn: get_file_active fails on a released file
        if file is None or file.released:
            return self._exit(gfn, private, errno.EFAULT)
        index = slot.pgoff + gfn - slot.base_gfn
        if file.bindings.get(index) is not slot:
            return self._exit(gfn, private, errno.EIO)
        inode = file.inode
        address = inode.backing.address(index)
        if address is None:
            return self._exit(gfn, private, errno.ENOMEM)
        state = inode.pages.get(index)  # get_folio's first step: a present order-0 folio needs nothing more
        if state == PAGE_ABSENT or inode.hugepage:
            state = inode.get_folio(index, state)
        if state == PAGE_HWPOISON:
            return self._exit(gfn, private, uapi.EHWPOISON)
        if write and slot.flags & _READONLY:
            return self._exit(gfn, private, errno.EFAULT)
        return inode, address

    def _gmem_spte(self, gfn: int, slot: Memslot, inode: GmemInode, address: int, private: bool) -> Spte:
        """The SPTE a guest_memfd fault maps (its level decided under mmu_lock); ``address``: page ``gfn``'s."""
        writable = not slot.flags & _READONLY
        if not inode.hugepage:  # upstream: order-0 folios only (kvm_gmem_get_pfn reports max_order 0)
            return Spte(gfn, PG_LEVEL_4K, slot, inode, slot.pgoff + gfn - slot.base_gfn, address, writable, private)
        level = self._gmem_level(gfn, slot, inode)
        n = level_pages(level)
        base_index = slot.gmem_index(gfn - gfn % n)
        base_address = inode.backing.address(base_index)
        assert base_address is not None
        return Spte(gfn - gfn % n, level, slot, inode, base_index, base_address, writable, private)

    def _gmem_level(self, gfn: int, slot: Memslot, inode: GmemInode) -> int:
        """4 KiB upstream (gmem reports order 0); 2 MiB for a sim huge-page file where the whole folio is
        present, unpoisoned, aligned and not "mixed" (the v12 RFC's huge-page rule). An attribute change keeps a
        fault off a region it is changing by adding the head/tail huge regions to the invalidation
        (kvm_arch_pre_set_memory_attributes); punch hole and poison invalidate whole folios."""
        profile = self.vm.profile
        if not inode.hugepage or profile.max_mapping_level < 2:
            return PG_LEVEL_4K
        n = level_pages(2)
        base = gfn - gfn % n
        if not slot.contains_region(base, 2):
            return PG_LEVEL_4K
        index = slot.gmem_index(base)
        if index % n or slot.mixed[2].get(base // n):
            return PG_LEVEL_4K
        if not inode.pages.is_uniform(index, index + n, PAGE_PRESENT):
            return PG_LEVEL_4K
        return 2

    def _hva(self, gfn: int, slot: Memslot | None, write: bool) -> _Hva | FaultResult:
        """F8 __kvm_faultin_pfn: the no-slot (MMIO) path, or the hva behind the slot."""
        if slot is None or (write and slot.readonly):
            self.counters.mmio_exits += 1
            return Mmio(gfn << uapi.PAGE_SHIFT, write)
        if not slot.hva_ok(slot.hva(gfn)):  # no provably mapped host memory behind the hva
            # hva_to_pfn finds no vma: KVM_PFN_ERR_FAULT, and kvm_handle_error_pfn returns a bare -EFAULT (no
            # kvm_prepare_memory_fault_exit, so KVM_RUN fails without KVM_EXIT_MEMORY_FAULT)
            self.counters.errors += 1
            return MemoryFault(0, gfn << uapi.PAGE_SHIFT, uapi.PAGE_SIZE, errno.EFAULT, reported=False)
        return _HVA

    def _hva_spte(self, gfn: int, slot: Memslot, private: bool) -> Spte:
        """The SPTE a fault served from the memslot's hva maps (its level decided under mmu_lock)."""
        level = self._hva_level(gfn, slot)
        n = level_pages(level)
        base = gfn - gfn % n
        return Spte(base, level, slot, None, 0, slot.hva(base), not slot.readonly, private)

    def _hva_level(self, gfn: int, slot: Memslot) -> int:
        """Largest level whose aligned region is inside the slot, hva-compatible, backed by a large enough
        host mapping, not dirty-logged, not "mixed" and not being invalidated (``hugepage_has_attrs``)."""
        profile = self.vm.profile
        if slot.dirty_logging:
            return PG_LEVEL_4K
        for level in range(min(profile.max_mapping_level, profile.host_mapping_level), 1, -1):
            n = level_pages(level)
            base = gfn - gfn % n
            if not slot.contains_region(base, level):
                continue
            hva = slot.hva(base)
            if hva % (n * uapi.PAGE_SIZE) or not slot.hva_ok(hva, n * uapi.PAGE_SIZE):
                continue
            if slot.mixed[level].get(base // n) or self.mmu.overlaps_in_progress(base, base + n):
                continue
            return level
        return PG_LEVEL_4K


class _Hva:
    """What F8 resolved when the page comes from the slot's hva (a guest_memfd folio is its inode)."""


_HVA = _Hva()
