"""Kernel steps: how the core's operations expose the points where the kernel can be interleaved.

Why: the fault path and every invalidation are written once, as generators that ``yield`` a ``Step`` before
each kernel step (with the locks that step takes and drops). The sim's normal path drives a generator to
completion in one go (``run_steps``), taking the real locks; the interleaving checker (``kvmgmem.check``)
drives several generators step by step over one model state. So the code the checker explores is the code
the sim runs, not a second description of it.

Step semantics: ``take`` is acquired before the step's body runs and ``drop`` released after it, so a step
with both is one lock hold; a lock taken by one step and dropped by a later one is held in between. ``read``
takes the ``take`` locks shared (``read_lock(&kvm->mmu_lock)`` in the TDP MMU fault). ``guard`` names a lock
the sim holds around the body only because Python readers cannot use RCU (the kernel runs that step under
``slots_lock``/``invalidate_lock`` and publishes with RCU); the checker ignores it. ``wait`` is a condition
the step blocks on (``synchronize_srcu``, ``mn_active_invalidate_count == 0``); the normal path never needs
it because its faults run whole under ``mmu_lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Documented acquisition order (Documentation/virt/kvm/locking.rst): a lock may only be taken while every
#: lock held has a lower rank.
RANK_SLOTS_LOCK = 1
RANK_INVALIDATE_LOCK = 2
RANK_MMU_LOCK = 3


@dataclass(eq=False)
class KLock:
    """One kernel lock of one object (``kvm->mmu_lock`` of a VM, an inode's ``invalidate_lock``...).
    ``owner`` may be renamed (the checker names its VMs vm1, vm2 for stable reports)."""

    name: str  # kernel name: "slots_lock", "invalidate_lock", "mmu_lock"
    owner: str  # what it belongs to, for reports: "vm1", "gmem ino 3"
    rank: int
    real: threading.Lock | threading.RLock  # what the sim's normal path takes for it

    def __str__(self) -> str:
        return f"{self.owner}.{self.name}"


@dataclass(frozen=True)
class Step:
    """The next kernel step of an operation, announced before it runs."""

    label: str  # the kernel function/statement, e.g. "F4 kvm_mmu_faultin_pfn: mmu_seq = mmu_invalidate_seq"
    take: tuple[KLock, ...] = ()
    drop: tuple[KLock, ...] = ()
    read: bool = False
    guard: KLock | None = None
    wait: Callable[[], bool] | None = None
    retry: bool = False  # RET_PF_RETRY: the vCPU re-enters the guest before faulting again


Steps = Generator[Step, None, T]


def run_steps(gen: Steps[T]) -> T:
    """Drive ``gen`` to completion on the calling thread, taking the real locks each step names."""
    held: list[threading.Lock | threading.RLock] = []
    try:
        step = next(gen)
        while True:
            for lock in step.take:
                lock.real.acquire()
                held.append(lock.real)
            guard = step.guard.real if step.guard is not None else None
            if guard is not None:
                guard.acquire()
                held.append(guard)
            try:
                following = gen.send(None)
            finally:
                if guard is not None:
                    guard.release()
                    held.remove(guard)
                for lock in step.drop:
                    lock.real.release()
                    held.remove(lock.real)
            step = following
    except StopIteration as stop:
        result: T = stop.value
        return result
    finally:
        for real in reversed(held):
            real.release()


# --- historic-bug switches -------------------------------------------------------------------------------
# Each name puts one fixed kernel bug back into the model (``VmCore.bugs``); the interleaving checker proves
# it finds every one. The normal sim never sets any.

#: A1 (guest_memfd v12 fix-up "Fix MMU invalidation bookkeeping"): gmem invalidation begins even when no
#: binding overlaps, but ends only when one does.
BUG_GMEM_START_UNCONDITIONAL = "gmem_start_unconditional"
#: A2 ("Actually truncate the inode when doing PUNCH_HOLE"): punch hole zaps but does not truncate.
BUG_PUNCH_NO_TRUNCATE = "punch_hole_no_truncate"
#: A3 ("Always add relevant ranges to invalidation set when changing attributes"): begin without range_add.
BUG_ATTR_NO_RANGE_ADD = "attr_change_without_range_add"
#: A4 ("Zap shared-only memslots when private attribute changes"): memslots without GUEST_MEMFD not zapped.
BUG_SKIP_SHARED_ONLY_SLOTS = "skip_shared_only_slots_on_attr_change"
#: C ("Retry page faults that hit an invalid memslot"): an INVALID memslot handled as no memslot (MMIO).
BUG_INVALID_SLOT_AS_NO_SLOT = "invalid_slot_as_no_slot"
#: D ("Prevent installing hugepages when mem attributes are changing"): head/tail huge regions not added.
BUG_NO_HUGEPAGE_HEAD_TAIL = "no_hugepage_head_tail_range_add"
#: E ("Move private vs. shared check above slot validity checks"): the F1 attribute read used after F4.
BUG_ATTR_BEFORE_SNAPSHOT = "fault_reads_attr_before_snapshot"
#: F ("Remove bindings on memslot deletion when gmem is dying"): unbind skips a file whose refcount is 0.
BUG_UNBIND_SKIPS_DYING_FILE = "unbind_skips_dying_file"
#: B ("KVM: Block memslot updates across range_start() and range_end()"): memslots are published while an
#: mm-notifier invalidation is between its start and end callbacks.
BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP = "notifier_ignores_memslot_swap"

BUGS = (
    BUG_GMEM_START_UNCONDITIONAL,
    BUG_PUNCH_NO_TRUNCATE,
    BUG_ATTR_NO_RANGE_ADD,
    BUG_SKIP_SHARED_ONLY_SLOTS,
    BUG_INVALID_SLOT_AS_NO_SLOT,
    BUG_NO_HUGEPAGE_HEAD_TAIL,
    BUG_ATTR_BEFORE_SNAPSHOT,
    BUG_UNBIND_SKIPS_DYING_FILE,
    BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP,
)
