"""A scenario's model state and its operations, each a generator of the core's kernel steps.

Why wrappers at all: the core's step generators are the kernel functions (``fault_steps``,
``set_memory_attributes_steps``, ``gmem_punch_steps``...); a *thread* of the checker is what calls them —
a vCPU that re-enters the guest after RET_PF_RETRY, a VMM thread holding an fd reference across a
fallocate, the last ``close()`` that runs ``kvm_gmem_release`` — and that part lives here.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmgmem import uapi
from kvmgmem.backends.sim.core.gmem import GmemFile, GmemInode
from kvmgmem.backends.sim.core.memslots import Memslot, MemslotChange
from kvmgmem.backends.sim.core.steps import Step, Steps
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.backends.sim.fault import FaultResult, MemoryFault, Retry


class ContentBacking:
    """Synthetic addresses plus the bytes' *meaning*: page index → a marker the guest wrote. ``discard``
    (truncation) forgets it, so a page that still carries a marker after a punch was never zeroed."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.data: dict[int, int] = {}
        self.released = False

    def address(self, pgoff: int) -> int | None:
        return self.base + pgoff * uapi.PAGE_SIZE

    def discard(self, first: int, last: int) -> None:
        for index in [i for i in self.data if first <= i < last]:
            del self.data[index]

    def release(self) -> None:
        self.released = True
        self.data.clear()

    def poison(self, pgoff: int) -> None:
        pass  # no host mappings in the model

    def prepare(self, pgoff: int) -> None:
        pass  # no bytes to make resident


@dataclass(frozen=True)
class Punched:
    """The result of a completed punch: these pages must read zero now."""

    inode: GmemInode
    backing: ContentBacking
    first: int
    last: int


@dataclass
class World:
    """One fresh model state and the threads to interleave over it."""

    vms: list[VmCore]
    ops: list[tuple[str, Iterator[Step]]] = field(default_factory=list)


def fault_op(vm: VmCore, gfn: int, write: bool = False) -> Steps[FaultResult]:
    """A vCPU touching ``gfn`` until the access resolves: RET_PF_RETRY re-enters the guest and faults again,
    and so does the benign memory-fault exit of a conversion that completed between F1 and F5 (the VMM
    re-runs KVM_RUN)."""
    while True:
        res = yield from vm.mmu.fault_steps(gfn << uapi.PAGE_SHIFT, write)
        benign = (
            isinstance(res, MemoryFault)
            and res.errno == errno.EFAULT
            and bool(res.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE) != vm.attributes.is_private(gfn)
        )
        if not (isinstance(res, Retry) or benign):
            return res
        yield Step("RET_PF_RETRY: re-enter the guest", retry=True)


def set_attributes_op(vm: VmCore, gfn: int, npages: int, attributes: int) -> Steps[None]:
    yield from vm.set_memory_attributes_steps(gfn, gfn + npages, attributes)


def _fput(vm: VmCore, file: GmemFile) -> Steps[None]:
    """fput: the last reference runs kvm_gmem_release (in whichever thread drops it)."""
    file.refs -= 1
    if file.refs == 0:
        yield from vm.release_gmem_file_steps(file)


def punch_op(vm: VmCore, file: GmemFile, backing: ContentBacking, first: int, last: int) -> Steps[Any]:
    """fallocate(PUNCH_HOLE) through the VMM's fd: fdget pins the file for the whole call."""
    yield Step("fdget(guest_memfd)")
    if file.refs == 0:
        return "EBADF"  # the fd was closed first
    file.refs += 1
    yield from vm.gmem_punch_steps(file, first, last)
    yield Step("fdput")
    yield from _fput(vm, file)
    return Punched(file.inode, backing, first, last)


def close_op(vm: VmCore, file: GmemFile) -> Steps[None]:
    """close(guest_memfd): drop the fd's reference; if it was the last, the file is dying until
    kvm_gmem_release gets slots_lock."""
    yield Step("close(fd): fput")
    yield from _fput(vm, file)


def delete_slot_op(vm: VmCore, slot_id: int) -> Steps[None]:
    """KVM_SET_USER_MEMORY_REGION2 with memory_size 0."""
    yield Step("kvm_set_memory_region: mutex_lock(slots_lock)", take=(vm.slots_klock,))
    space = vm.memslots[0]
    old = space.get(slot_id)
    if old is not None:
        yield from vm.set_memslot_steps(space, old, None, MemslotChange.DELETE)
    yield Step("mutex_unlock(slots_lock)", drop=(vm.slots_klock,))


def create_slot_op(vm: VmCore, slot_id: int, gfn: int, npages: int, hva: int) -> Steps[None]:
    """KVM_SET_USER_MEMORY_REGION2 creating a plain (shared-only) memslot over host memory at ``hva``."""
    yield Step("kvm_set_memory_region: mutex_lock(slots_lock)", take=(vm.slots_klock,))
    new = Memslot(slot_id, 0, gfn, npages, 0, hva, (hva, hva + npages * uapi.PAGE_SIZE))
    yield from vm.set_memslot_steps(vm.memslots[0], None, new, MemslotChange.CREATE)
    yield Step("mutex_unlock(slots_lock)", drop=(vm.slots_klock,))


def move_slot_op(vm: VmCore, slot_id: int, gfn: int) -> Steps[None]:
    """KVM_SET_USER_MEMORY_REGION2 moving a plain memslot to ``gfn`` (KVM_MR_MOVE)."""
    yield Step("kvm_set_memory_region: mutex_lock(slots_lock)", take=(vm.slots_klock,))
    space = vm.memslots[0]
    old = space.get(slot_id)
    assert old is not None
    new = Memslot(slot_id, 0, gfn, old.npages, old.flags, old.userspace_addr, old.hva_live)
    yield from vm.set_memslot_steps(space, old, new, MemslotChange.MOVE)
    yield Step("mutex_unlock(slots_lock)", drop=(vm.slots_klock,))


def allocate_op(vm: VmCore, file: GmemFile, first: int, last: int) -> Steps[None]:
    """fallocate(KEEP_SIZE) through the VMM's fd (the fd pins the file)."""
    yield Step("fdget(guest_memfd)")
    file.refs += 1
    yield from vm.gmem_allocate_steps(file, first, last)
    yield Step("fdput")
    yield from _fput(vm, file)


def hva_invalidate_op(vm: VmCore, hva: int, length: int) -> Steps[None]:
    """The host changes memory behind a memslot (munmap, migration): the mm notifier's start/end pair."""
    yield from vm.mmu_notifier_invalidate_steps(hva, hva + length)
