"""The sim's TDP MMU of one VM: ``mmu_lock``, the invalidation protocol (``kvm_mmu_invalidate_begin``/
``_range_add``/``_end``, ``mmu_invalidate_retry_gfn``) and the zap-then-flush sequence every writer uses; it
owns the SPTE map (``core/spte_map.py``) and the page fault (``core/fault_path.py``), and this module holds the
contract both present to the CPU layer.

Why a model of SPTEs at all: a software CPU caches translations exactly like hardware does, so the kernel's
discipline — zap, flush, then change, then let faults re-evaluate — is what keeps the guest from reading
memory that attributes, bindings or punched pages no longer allow. The SPTE map is what tests inspect to
prove it.

Contract for the CPU layer (``backends/sim/cpu*``, part 2)
===========================================================

**Fault entry point.** ``VmCore.handle_fault(gpa, write=False, fetch=False, private=None)`` (same as
``Mmu.fault``, bound to ``FaultPath.fault``) is called by a vCPU thread whenever it has no cached translation
for ``gpa`` (TLB fill = EPT walk). It is thread-safe (takes ``mmu.lock`` only, never the ioctl lock) and
returns one of the results of ``backends/sim/fault.py`` (the same objects reach the CPU):

- ``Mapped`` — an SPTE now maps ``[gpa, gpa + size)`` (4 KiB, 2 MiB or 1 GiB, ``level``
  1/2/3) to process memory starting at ``host_ptr`` (a real address: the guest_memfd storage base +
  offset, or the memslot's ``userspace_addr`` + offset). ``host_address_of(gpa)`` gives the byte for any gpa
  inside. ``writable`` False means a write must not be served from this translation (READONLY slot): call
  ``handle_fault(gpa, write=True)`` which returns ``Mmio`` for it. ``spurious`` means the SPTE
  already existed.
- ``MemoryFault`` — KVM_RUN must fail with ``errno`` (EFAULT, EHWPOISON, EIO, ENOMEM) and, when
  ``reported``, ``exit_reason`` 39; the vCPU builds the ``MemoryFaultExit`` from it (gpa page aligned, size
  4096, flags PRIVATE iff the access was private). The instruction has not executed; re-running retries it.
- ``Mmio`` — no memslot (or a write to a READONLY slot): emulate as KVM_EXIT_MMIO.
- ``Retry`` — an invalidation covering the gfn is in progress (or the slot is being deleted/moved):
  nothing was installed; retry the access (yield the GIL first, the invalidating thread needs it).
  A shared access whose userspace_addr is not host memory the sim can prove is mapped is a
  ``MemoryFault`` that is not ``reported`` (EFAULT, flags 0): a failed hva → pfn translation is
  KVM_PFN_ERR_FAULT, for which ``kvm_handle_error_pfn`` returns a bare -EFAULT without
  ``kvm_prepare_memory_fault_exit``, so KVM_RUN fails with no exit filled (``exit_reason`` stays KVM_EXIT_UNKNOWN).

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

**Kernel steps.** ``Mmu.fault_steps`` (``FaultPath.fault_steps``) is the same fault as a generator that stops
at each kernel step (F1–F3, F4 snapshot of ``mmu_invalidate_seq``, F5–F7, F8 pfn lookup outside the lock,
F10–F13 re-check with ``mmu_invalidate_retry_gfn`` and install under ``mmu_lock``); ``fault`` runs it straight
through under ``lock``.
The writers (``memslot_ops.py``, ``attribute_ops.py``, ``gmem_ops.py``, ``mmu_notifier.py``) are step
generators too (``core/steps.py``); ``kvmgmem.check`` interleaves them.

**Storage release.** ``VmCore.add_gmem_release_listener(callback)`` registers ``callback(inode)`` called
just before a guest_memfd inode's storage is unmapped (after its SPTEs were zapped), so a CPU that mapped
the storage window (e.g. ``mem_map_ptr``) unmaps it first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .fault_path import FaultPath
from .spte_map import SpteMap
from .steps import RANK_MMU_LOCK, KLock, Step, Steps

if TYPE_CHECKING:
    from .vm import VmCore

ZapListener = Callable[[int, int], None]


@dataclass
class MmuCounters:
    """What the fault path and the zaps did, counted where it happens: tests and benches read these to prove
    that a pass made real faults (not spurious ones) and that an operation zapped what it should."""

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
    """The MMU of one VM: the lock, the invalidation state that faults check, the SPTE map and the fault.

    ``fault``, ``fault_steps``, ``zap``, ``lookup``, ``overlapping`` and ``sptes`` are the components' bound
    methods, set once here: the fault is the sim's hot path, and a wrapper method would add a call to each.
    """

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.klock = KLock("mmu_lock", vm.name, RANK_MMU_LOCK, self.lock)
        self.seq = 0  # mmu_invalidate_seq
        self.in_progress = 0  # mmu_invalidate_in_progress
        self.range_start: int | None = None  # mmu_invalidate_range_start (None: INVALID_GPA)
        self.range_end: int | None = None
        self.counters = MmuCounters()
        self.zap_listeners: list[ZapListener] = []
        self.spte_map = SpteMap(self.counters)
        self.fault_path = FaultPath(vm, self)
        self.fault = self.fault_path.fault
        self.fault_steps = self.fault_path.fault_steps
        self.step_entry = self.fault_path.step_entry
        self.zap = self.spte_map.zap  # caller holds ``lock``
        self.lookup = self.spte_map.lookup
        self.overlapping = self.spte_map.overlapping
        self.sptes = self.spte_map.all

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

    # --- zap, then flush, then let the caller change state (every writer's sequence) ----------------------------

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
        """kvm_mmu_invalidate_end under mmu_lock, for an :meth:`invalidate_steps` that began (had ranges)."""
        if not ranges:
            return
        yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(self.klock,), drop=(self.klock,))
        self.invalidate_end()
