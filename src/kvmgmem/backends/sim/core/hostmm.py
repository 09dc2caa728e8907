"""What the host's mm does to a VM and its guest_memfds: madvise and faults on a file's mapping, munmap and
MADV_DONTNEED under a memslot (the mmu notifier), memory failure on a page.

Why in the core: the adapters own the host mappings (``mapping.py``, ``storage.py``) and learn about these events,
but what the kernel makes of each — which errno, which file range is punched, which pages count as allocated,
what a memslot may still reach — is a rule of the model. The adapters call these with plain numbers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .gmem import GmemFile
from .steps import Steps, run_steps
from .vm import VmCore


def host_may_touch(file: GmemFile) -> bool:
    """Whether the host's accesses through a mapping of ``file`` reach its pages (``kvm_gmem_fault_user_mapping``).

    Only a file created with GUEST_MEMFD_FLAG_INIT_SHARED: every page of any other is private memory, and a host
    fault on it is SIGBUS. (Past EOF and on a hwpoisoned page it is SIGBUS too; the adapter's storage does that
    page by page.)
    """
    return file.inode.init_shared


def memory_failure(file: GmemFile, offset: int) -> None:
    """The sim-only ``inject_poison`` at byte ``offset`` of the file (the u64 a caller passes, read as a loff_t):
    negative is EINVAL; else ``kvm_gmem_error_folio`` on the page holding it (``VmCore.gmem_poison``: EINVAL past
    the end of the file)."""
    off = uapi.signed64(offset)
    if off < 0:
        raise KvmError(errno.EINVAL, "inject_poison", "negative offset")
    file.vm.gmem_poison(file, off >> uapi.PAGE_SHIFT)


def madvise_remove(file: GmemFile, map_offset: int, map_length: int, start: int, length: int) -> None:
    """madvise(MADV_REMOVE) on ``[start, start + length)`` of a mapping of ``file`` (``map_length`` bytes from file
    byte ``map_offset``; ``start`` inside it).

    ``do_madvise``: a start that is not page aligned is EINVAL, the length is rounded up to whole pages (and kept
    inside the mapping); then ``madvise_remove`` punches the file range (``vfs_fallocate`` with
    PUNCH_HOLE | KEEP_SIZE, so ``kvm_gmem_fallocate`` zaps the SPTEs and frees the pages). Nothing happens for a
    length of 0.
    """
    if start % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, "madvise", "start not page aligned")
    length = min(-(-length // uapi.PAGE_SIZE) * uapi.PAGE_SIZE, map_length - start)
    if length:
        mode = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
        file.vm.gmem_fallocate(file, mode, map_offset + start, length)


def user_faults(file: GmemFile, populated: Callable[[], Iterable[tuple[int, int]]]) -> None:
    """The host touched pages through a mapping of the file: ``kvm_gmem_fault_user_mapping`` allocated their folios.

    The adapter learns of them afterwards, as the page ranges ``populated()`` reports (read under the VM's mmu lock);
    they become present, unless the inode died meanwhile.
    """
    with file.vm.mmu.lock:
        if not file.inode.alive:
            return
        for first, last in populated():
            file.inode.materialise(first, last)


def mmu_notifier_invalidate(vm: VmCore, hva_start: int, hva_end: int, unmap: bool) -> None:
    """The host is about to discard (``unmap`` False, MADV_DONTNEED) or unmap (munmap) ``[hva_start, hva_end)``.

    ``kvm_mmu_notifier_invalidate_range_start``/``_end`` zap the memslots' SPTEs there. An unmap also takes the
    range out of what the slots may reach, so a later guest access fails as the kernel's hva fault does (EFAULT)
    instead of touching unmapped memory; a hole in the middle of a slot's live range keeps only the part below it
    (the sim tracks one range per slot).
    """

    def trim() -> None:
        for space in vm.memslots:
            for slot in space:
                live = slot.hva_live
                if live is None or live[1] <= hva_start or hva_end <= live[0]:
                    continue
                below = (live[0], hva_start) if live[0] < hva_start else None
                above = (hva_end, live[1]) if hva_end < live[1] and below is None else None
                slot.hva_live = below or above

    def steps() -> Steps[None]:
        for step in vm.mmu_notifier_invalidate_steps(hva_start, hva_end):
            yield step
            if unmap and step.label.startswith("the host changes"):
                trim()

    run_steps(steps())
