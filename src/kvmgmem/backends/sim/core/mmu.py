"""The sim's TDP MMU: SPTEs, the page-fault algorithm (``kvm_mmu_faultin_pfn``), the invalidation
protocol (``kvm_mmu_invalidate_begin``/``_end``) and huge-page rules (``hugepage_has_attrs``; the v12 RFC's
huge-page guest_memfd flag).

Why a model of SPTEs at all: a software CPU caches translations exactly like hardware does, so the kernel's
discipline — zap, flush, then change, then let faults re-evaluate — is what keeps the guest from reading
memory that attributes, bindings or punched pages no longer allow. The SPTE map is what tests inspect to
prove it.

Contract for the CPU layer (``backends/sim/cpu*``, part 2)
===========================================================

**Fault entry point.** ``VmCore.handle_fault(gpa, write=False, fetch=False, private=None)`` (same as
``Mmu.fault``) is called by a vCPU thread whenever it has no cached translation for ``gpa`` (TLB fill =
EPT walk). It is thread-safe (takes ``mmu.lock`` only, never the ioctl lock) and returns one of the results
of ``backends/sim/fault.py`` (the same objects reach the CPU):

- ``Mapped`` — an SPTE now maps ``[gpa, gpa + size)`` (4 KiB, 2 MiB or 1 GiB, ``level``
  1/2/3) to process memory starting at ``host_ptr`` (a real address: the guest_memfd storage base +
  offset, or the memslot's ``userspace_addr`` + offset). ``host_address_of(gpa)`` gives the byte for any gpa
  inside. ``writable`` False means a write must not be served from this translation (READONLY slot): call
  ``handle_fault(gpa, write=True)`` which returns ``Mmio`` for it. ``spurious`` means the SPTE
  already existed.
- ``MemoryFault`` — KVM_RUN must fail with ``errno`` (EFAULT, EHWPOISON, EIO, ENOMEM) and
  ``exit_reason`` 39; the vCPU builds the ``MemoryFaultExit`` from it (gpa page aligned, size 4096,
  flags PRIVATE iff the access was private). The instruction has not executed; re-running retries it.
- ``Mmio`` — no memslot (or a write to a READONLY slot): emulate as KVM_EXIT_MMIO.
- ``Retry`` — an invalidation covering the gfn is in progress (or the slot is being deleted/moved):
  nothing was installed; retry the access (yield the GIL first, the invalidating thread needs it).
  A shared access whose userspace_addr is not host memory the sim can prove is mapped is also a
  memory-fault exit (EFAULT, flags 0), as KVM reports a failed hva → pfn translation.

``private=None`` derives the access type from the gfn's PRIVATE attribute, as KVM does for
KVM_X86_SW_PROTECTED_VM (``kvm_mmu_page_fault`` derives it from the attribute); pass True/False to model hardware that
reports it (a mismatch then gives
the private/shared mismatch exit of ``kvm_mmu_faultin_pfn``).

**Zap notification.** ``VmCore.add_zap_listener(callback)`` registers ``callback(gfn_start, gfn_end)``. It is
called for every zap (attribute change, punch hole, hwpoison, gmem release, memslot delete/move/flags change,
VM destruction) after the SPTEs are gone and **before the state change becomes visible**; the invalidation
stays "in progress" (faults in the range return Retry) until the callback returns, so a CPU must drop
every cached translation in ``[gfn_start, gfn_end)`` — kicking and waiting for running vCPUs if needed —
before returning. The callback runs on the ioctl's thread with ``mmu.lock`` released (a vCPU blocked in
``handle_fault`` can make progress), but with the VM's ioctl lock held: it must not issue VM ioctls.

**Kernel steps.** ``Mmu.fault_steps`` is the same fault as a generator that stops at each kernel step
(F1–F3, F4 snapshot of ``mmu_invalidate_seq``, F5–F7, F8 pfn lookup outside the lock, F10–F13 re-check with
``mmu_invalidate_retry_gfn`` and install under ``mmu_lock``); ``fault`` runs it straight through under ``lock``.
The writers in ``vm.py`` are step generators too (``core/steps.py``); ``kvmgmem.check`` interleaves them.

**Storage release.** ``VmCore.add_gmem_release_listener(callback)`` registers ``callback(inode)`` called
just before a guest_memfd inode's storage is unmapped (after its SPTEs were zapped), so a CPU that mapped
the storage window (e.g. ``mem_map_ptr``) unmaps it first.
"""

from __future__ import annotations

import errno
import threading
from bisect import bisect_left, insort
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmgmem import uapi

from ..fault import FaultResult, Mapped, MemoryFault, Mmio, Retry
from .gmem import PAGE_HWPOISON, PAGE_PRESENT, GmemInode
from .memslots import Memslot
from .profile import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, level_pages
from .steps import (
    BUG_ATTR_BEFORE_SNAPSHOT,
    BUG_INVALID_SLOT_AS_NO_SLOT,
    RANK_MMU_LOCK,
    KLock,
    Step,
    Steps,
)

if TYPE_CHECKING:
    from .vm import VmCore

ZapListener = Callable[[int, int], None]
REGION_SHIFT = 9  # SPTE index buckets: 2 MiB of gfns
_PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
_GUEST_MEMFD = uapi.KVM_MEM_GUEST_MEMFD
_READONLY = uapi.KVM_MEM_READONLY
_PAGE_SIZE = uapi.PAGE_SIZE
_PAGE_SHIFT = uapi.PAGE_SHIFT
_PAGES_2M = level_pages(PG_LEVEL_2M)
_PAGES_1G = level_pages(PG_LEVEL_1G)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Spte:
    """One installed mapping: ``npages`` gfns from ``gfn`` to host memory from ``host_address``."""

    gfn: int
    level: int
    slot: Memslot
    gmem: GmemInode | None  # None: served from the slot's userspace_addr
    pgoff: int  # first guest_memfd page index (gmem) — unused for hva mappings
    host_address: int
    writable: bool
    private: bool  # the fault that installed it was private

    @property
    def npages(self) -> int:
        return level_pages(self.level)

    @property
    def end_gfn(self) -> int:
        return self.gfn + self.npages

    @property
    def backing(self) -> str:
        return "gmem" if self.gmem is not None else "hva"


@dataclass
class MmuCounters:
    faults: int = 0
    mapped: int = 0
    spurious: int = 0
    memory_fault_exits: int = 0
    mmio_exits: int = 0
    retries: int = 0
    errors: int = 0
    huge_mappings: int = 0
    invalidations: int = 0
    zaps: int = 0
    sptes_zapped: int = 0


class Mmu:
    """SPTEs of one VM (address space 0) plus the invalidation state that fault handling checks."""

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self._sptes: dict[int, Spte] = {}
        # The SPTEs' first gfns by 2 MiB region (gfn >> REGION_SHIFT), and the occupied regions sorted: a range
        # query costs O(log regions + regions and SPTEs touched), and an install or a zap never shifts a list
        # of every SPTE (a sorted list of gfns did: zapping half of 262k SPTEs one delete at a time took 2 s).
        self._regions: dict[int, set[int]] = {}
        self._region_keys: list[int] = []
        self._nr_huge = 0  # SPTEs above 4 KiB: while 0, a lookup needs one probe, not three
        self.seq = 0  # mmu_invalidate_seq
        self.in_progress = 0  # mmu_invalidate_in_progress
        self.range_start: int | None = None  # mmu_invalidate_range_start (None: INVALID_GPA)
        self.range_end: int | None = None
        self.counters = MmuCounters()
        self.zap_listeners: list[ZapListener] = []
        self.klock = KLock("mmu_lock", vm.name, RANK_MMU_LOCK, self.lock)
        self._result: FaultResult | None = None
        # The fault's steps, built once (the normal path yields them on every fault).
        self.step_entry = Step("F1-F3 kvm_mmu_page_fault: attribute, fast_page_fault; srcu_read_lock, gfn_to_memslot")
        self._step_snapshot = Step("F4 kvm_mmu_faultin_pfn: mmu_seq = mmu_invalidate_seq; smp_rmb()")
        self._step_checks = Step("F5-F7 kvm_mmu_faultin_pfn: slot validity, private vs shared")
        self._step_pfn = Step("F8 __kvm_mmu_faultin_pfn (kvm_gmem_get_pfn / hva)")
        self._step_map = Step("F10-F13 read_lock(mmu_lock); is_page_fault_stale; kvm_tdp_mmu_map; unlock",
                              take=(self.klock,), drop=(self.klock,), read=True)  # fmt: skip

    # --- SPTE map --------------------------------------------------------------------------------------

    def lookup(self, gfn: int) -> Spte | None:
        """The SPTE mapping ``gfn`` (any level): at ``gfn`` rounded down to 4 KiB, 2 MiB, 1 GiB."""
        sptes = self._sptes
        s = sptes.get(gfn)
        if s is not None and s.level == PG_LEVEL_4K:
            return s
        if not self._nr_huge:
            return None
        s = sptes.get(gfn & ~(_PAGES_2M - 1))
        if s is not None and s.level == PG_LEVEL_2M:
            return s
        s = sptes.get(gfn & ~(_PAGES_1G - 1))
        if s is not None and s.level == PG_LEVEL_1G:
            return s
        return None

    def sptes(self) -> list[Spte]:
        """Every SPTE, by gfn."""
        sptes, regions = self._sptes, self._regions
        return [sptes[g] for r in self._region_keys for g in sorted(regions[r])]

    def overlapping(self, lo: int, hi: int) -> list[Spte]:
        """SPTEs intersecting ``[lo, hi)``, in O(log regions + regions and SPTEs touched): only a huge SPTE
        can start before ``lo`` and still cover it, and it then starts at ``lo`` rounded down to its level,
        so two lookups find those; the rest start inside the range and come from its regions."""
        out: list[Spte] = []
        sptes = self._sptes
        for level in (PG_LEVEL_1G, PG_LEVEL_2M):
            n = level_pages(level)
            base = lo - lo % n
            if base < lo:
                s = sptes.get(base)
                if s is not None and s.level == level and s.end_gfn > lo:
                    out.append(s)
        if hi <= lo:
            return out
        keys, regions = self._region_keys, self._regions
        i = bisect_left(keys, lo >> REGION_SHIFT)
        last = (hi - 1) >> REGION_SHIFT
        n_keys = len(keys)
        while i < n_keys and keys[i] <= last:
            r = keys[i]
            gfns = regions[r]
            start, end = max(lo, r << REGION_SHIFT), min(hi, (r + 1) << REGION_SHIFT)
            if end - start == 1 << REGION_SHIFT:
                out.extend(sptes[g] for g in gfns)  # the whole region is inside the range
            elif end - start < len(gfns):
                out.extend(sptes[g] for g in range(start, end) if g in gfns)  # a few gfns of a full region
            else:
                out.extend(sptes[g] for g in gfns if start <= g < end)
            i += 1
        return out

    def _add(self, s: Spte) -> None:
        self._sptes[s.gfn] = s
        if s.level != PG_LEVEL_4K:
            self._nr_huge += 1
        r = s.gfn >> REGION_SHIFT
        gfns = self._regions.get(r)
        if gfns is None:
            self._regions[r] = {s.gfn}
            insort(self._region_keys, r)  # one per new 2 MiB region, not per SPTE
        else:
            gfns.add(s.gfn)

    def _remove(self, s: Spte) -> None:
        del self._sptes[s.gfn]
        if s.level != PG_LEVEL_4K:
            self._nr_huge -= 1
        r = s.gfn >> REGION_SHIFT
        gfns = self._regions[r]
        gfns.discard(s.gfn)
        if not gfns:
            del self._regions[r]
            del self._region_keys[bisect_left(self._region_keys, r)]

    def zap(self, lo: int, hi: int) -> int:
        """Drop every SPTE intersecting ``[lo, hi)`` (whole huge SPTEs). Caller holds ``lock``. Cost
        O(log regions + regions and SPTEs touched): emptied regions leave the sorted keys in one splice."""
        victims = self.overlapping(lo, hi)
        if victims:
            sptes, regions = self._sptes, self._regions
            emptied = False
            for s in victims:
                del sptes[s.gfn]
                if s.level != PG_LEVEL_4K:
                    self._nr_huge -= 1
                gfns = regions[s.gfn >> REGION_SHIFT]
                gfns.discard(s.gfn)
                emptied = emptied or not gfns
            if emptied:
                keys = self._region_keys
                first = min(lo, victims[0].gfn) >> REGION_SHIFT
                i, j = bisect_left(keys, first), bisect_left(keys, ((hi - 1) >> REGION_SHIFT) + 1)
                for r in keys[i:j]:
                    if not regions[r]:
                        del regions[r]
                keys[i:j] = [r for r in keys[i:j] if r in regions]
        self.counters.zaps += 1
        self.counters.sptes_zapped += len(victims)
        return len(victims)

    def _install(self, spte: Spte, old: Spte | _Unknown | None) -> Spte:
        """kvm_tdp_mmu_map's SPTE write of ``spte`` (built by ``_gmem_spte``/``_hva_spte``). ``old``: the SPTE
        covering its gfn when the caller knows it is still the current one (looked up under this same hold of
        ``lock``), else ``UNKNOWN``."""
        if spte.level == PG_LEVEL_4K:  # replaces at most the one SPTE covering the gfn (cheaper than a scan)
            if isinstance(old, _Unknown):
                old = self.lookup(spte.gfn)
            if old is not None:
                self._remove(old)
        else:
            for s in self.overlapping(spte.gfn, spte.end_gfn):  # smaller SPTEs replaced by a huge one
                self._remove(s)
        self._add(spte)
        return spte

    # --- invalidation protocol (kvm_mmu_invalidate_begin/end) ---------------------------------------------------------
    # kvm_mmu_invalidate_begin / kvm_mmu_invalidate_range_add / kvm_mmu_invalidate_end, as the kernel keeps
    # them: one counter, one hull of every range added since the counter went 0 -> 1 (reset at that begin,
    # not at end), one sequence number bumped at every end. Callers hold ``lock`` (mmu_lock for write).

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The open invalidation hull as a list (empty when nothing is in progress)."""
        if self.in_progress > 0 and self.range_start is not None and self.range_end is not None:
            return [(self.range_start, self.range_end)]
        return []

    def invalidate_begin(self) -> None:
        """kvm_mmu_invalidate_begin."""
        self.in_progress += 1
        if self.in_progress == 1:
            self.range_start = self.range_end = None  # INVALID_GPA
        self.counters.invalidations += 1

    def invalidate_range_add(self, lo: int, hi: int) -> None:
        """kvm_mmu_invalidate_range_add: the first range sets the hull, later ones widen it."""
        if self.range_start is None or self.range_end is None:
            self.range_start, self.range_end = lo, hi
        else:
            self.range_start, self.range_end = min(self.range_start, lo), max(self.range_end, hi)

    def invalidate_end(self) -> None:
        """kvm_mmu_invalidate_end: seq++ then in_progress-- (a fault that snapshotted before sees the bump)."""
        self.seq += 1
        self.in_progress -= 1

    def overlaps_in_progress(self, lo: int, hi: int) -> bool:
        """Whether ``[lo, hi)`` meets the open hull (an INVALID hull meets nothing, as in the kernel)."""
        return (
            self.in_progress > 0
            and self.range_start is not None
            and self.range_end is not None
            and self.range_start < hi
            and lo < self.range_end
        )

    def retry_gfn(self, mmu_seq: int, gfn: int) -> bool:
        """mmu_invalidate_retry_gfn: an open invalidation covers ``gfn``, or one ended since the snapshot."""
        return self.overlaps_in_progress(gfn, gfn + 1) or self.seq != mmu_seq

    def notify_zap(self, lo: int, hi: int) -> None:
        """The TLB flush after a zap: every CPU drops its cached translations (contract above)."""
        for cb in list(self.zap_listeners):
            cb(lo, hi)

    def notify_zaps(self, ranges: list[tuple[int, int]]) -> None:
        """One kvm_flush_remote_tlbs for an operation that zapped several ranges (one per memslot it met): the
        listeners get the ranges' hull once. Over-flushing the gaps between memslots is harmless (nothing can
        be cached there), while a flush per range costs a kick and ack per vCPU each (300 memslots: 18 ms)."""
        if ranges:
            self.notify_zap(min(lo for lo, _ in ranges), max(hi for _, hi in ranges))

    def invalidate_steps(
        self, ranges: list[tuple[int, int]], force: bool = False, flush: str = "kvm_flush_remote_tlbs_range"
    ) -> Steps[None]:
        """begin + range_add + zap in one mmu_lock hold, then the flush (step label ``flush``) with the lock
        dropped. The caller changes state in its own steps and ends the invalidation. Nothing happens without
        ranges unless ``force`` (a caller that decided to begin anyway: guest_memfd's historic bug)."""
        if not ranges and not force:
            return
        yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_begin; kvm_mmu_unmap_gfn_range", take=(self.klock,),
                   drop=(self.klock,))  # fmt: skip
        self.invalidate_begin()
        for lo, hi in ranges:
            self.invalidate_range_add(lo, hi)
            self.zap(lo, hi)
        yield Step("kvm_flush_remote_tlbs_range")
        self.notify_zaps(ranges)

    def end_steps(self, ranges: list[tuple[int, int]]) -> Steps[None]:
        if not ranges:
            return
        yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(self.klock,), drop=(self.klock,))
        self.invalidate_end()

    # --- the fault (kvm_mmu_faultin_pfn) ------------------------------------------------------------------------------

    def fault(self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None) -> FaultResult:
        """Resolve a guest access to ``gpa`` (see the module docstring for the outcomes): ``fault_steps``
        run whole under ``lock``, so on the sim's threads a fault is atomic with respect to writers."""
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
        vm = self.vm
        c = self.counters
        if stepping:
            yield self.step_entry
        # F1 (SW_PROTECTED: private from the current attribute), F3 fast_page_fault
        c.faults += 1
        f1_private = vm.attributes.get(gfn) & _PRIVATE != 0
        existing = self.lookup(gfn)
        # An SPTE exists only while the attribute still says what it was installed for (every attribute
        # change zaps first), so a reported access type matching it is spurious too.
        if (
            existing is not None
            and (private is None or existing.private == bool(private))
            and (existing.writable or not write)
        ):
            c.spurious += 1
            if existing.level == PG_LEVEL_4K:  # what _mapped builds, for the common case
                result = Mapped(existing.host_address, _PAGE_SIZE, existing.writable, gfn << _PAGE_SHIFT, 1,
                                existing.gmem is not None, True)  # fmt: skip
                self._result = result
                return result
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
            mmu_seq = self.seq  # F4 fault->mmu_seq = mmu_invalidate_seq; smp_rmb()
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
            if self.seq != mmu_seq or (self.in_progress and self.retry_gfn(mmu_seq, gfn)):
                return self._done(self._retry("invalidation in progress"))
            # F12 kvm_tdp_mmu_map: the level is decided under the lock (lpage_info "mixed")
            if type(pfn) is tuple:
                spte = self._gmem_spte(gfn, slot, pfn[0], pfn[1], is_private)
            else:
                spte = self._hva_spte(gfn, slot, is_private)
            # Straight through, mmu_lock was held since F3, so its lookup still holds; stepping, it may not.
            self._install(spte, _UNKNOWN if stepping else existing)
            c.mapped += 1
            level = spte.level
            if level == PG_LEVEL_4K:  # what _mapped builds, for the common case
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
        if inode.get_folio(index) == PAGE_HWPOISON:
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
        present, unpoisoned, aligned and not "mixed" (the v12 RFC's huge-page rule). An attribute change keeps a fault
        off a
        region it is changing by adding the head/tail huge regions to the invalidation (kvm_arch_pre_set_
        memory_attributes); punch hole and poison invalidate whole folios."""
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
            self.counters.errors += 1
            return self._exit(gfn, False, errno.EFAULT)
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
            if slot.mixed[level].get(base // n) or self.overlaps_in_progress(base, base + n):
                continue
            return level
        return PG_LEVEL_4K


class _Unknown:
    """``_install``'s "look the old SPTE up again" marker (None already means "no SPTE")."""


_UNKNOWN = _Unknown()


class _Hva:
    """What F8 resolved when the page comes from the slot's hva (a guest_memfd folio is its inode)."""


_HVA = _Hva()
