"""Host mmap of a sim guest_memfd (6.18+, ``kvm_gmem_mmap``): a real ``kvmgmem.GmemMapping``, as on kvm.

Why real pages and not checked copies: code tested on the sim must behave as on kvm — buffer protocol,
``mmap.mmap`` slicing, zero-copy addresses, and a real SIGBUS where ``kvm_gmem_fault_user_mapping`` gives
one. The mapping aliases the inode's storage memfd (``storage.py``); pages the host may not touch (a file
without INIT_SHARED is private memory; hwpoisoned pages) are mapped from an empty memfd, so touching them
raises SIGBUS in the process, and beyond EOF the storage memfd SIGBUSes by itself. The storage keeps every
live mapping and re-points pages whose state changes (poison, and punching a poisoned page), as the kernel
zaps user mappings. The host therefore never reads or writes private memory.

What the kernel does in guest_memfd terms is decided by the model: MADV_REMOVE punches the file
(``hostmm.madvise_remove``: SPTEs zapped, pages freed), MADV_COLLAPSE is EINVAL (``GmemFile.madvise_collapse``).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import weakref
from collections.abc import Callable

from kvmgmem import uapi
from kvmgmem.errors import KvmError
from kvmgmem.gmem_mapping import GmemMapping
from kvmgmem.libc import MADV_COLLAPSE, MADV_REMOVE, MAP_NORESERVE, PROT_RW, c_mmap, munmap

from .core import hostmm
from .core.gmem import GmemFile
from .storage import GmemStorage, empty_fd


def _put_file(file: GmemFile) -> None:
    file.put()


class SimMapper:
    """The sim's side of one ``GmemMapping`` (``kvmgmem.gmem_mapping.MappingBackend``): it holds a
    reference on the file (an mmap pins the file, as ``kvm_gmem_mmap``'s does: closing the fd keeps the memory)."""

    def __init__(self, file: GmemFile, storage: GmemStorage) -> None:
        self.file = file
        self.storage = storage
        self.accessible = hostmm.host_may_touch(file)
        self.finalizer: Callable[[], object] | None = None

    def madvise(self, mapping: GmemMapping, option: int, start: int, length: int) -> bool:
        if option == MADV_COLLAPSE:
            self.file.madvise_collapse()
        if option != MADV_REMOVE:
            return False
        if not 0 <= start < len(mapping):
            raise ValueError("madvise start out of range")  # as mmap.mmap.madvise: a Python error, not an errno
        hostmm.madvise_remove(self.file, mapping.offset, len(mapping), start, length)
        return True

    def unmap(self, mapping: GmemMapping, munmap: Callable[[], None]) -> None:
        with self.storage.lock:
            munmap()
            self.storage.mappings.discard(mapping)
        if self.finalizer is not None:
            self.finalizer()

    def live_bytes(self, mapping: GmemMapping) -> int:
        """Leading bytes of the mapping backed by the file's pages (0 for private memory): what a memslot
        using the mapping as its userspace may reach without a SIGBUS."""
        if not self.accessible:
            return 0
        return max(0, min(len(mapping), self.storage.size - mapping.offset))


def map_gmem(file: GmemFile, fd: int, length: int, offset: int, shared: bool) -> GmemMapping:
    """mmap(2) of a sim guest_memfd, with the kernel's errnos in its order.

    The generic checks of ``do_mmap`` (unaligned offset, length 0 → EINVAL; length above TASK_SIZE →
    ENOMEM; offset past the maximum file size → EOVERFLOW) come from the host kernel itself, by mapping
    the storage memfd (a regular shmem file, so the same limits); then ``kvm_gmem_mmap``'s own: no
    GUEST_MEMFD_FLAG_MMAP → ENODEV, not MAP_SHARED → EINVAL (decided by the core, ``GmemFile.mmap``)."""
    storage: GmemStorage = file.inode.backing  # type: ignore[assignment]
    if storage.fd < 0:
        raise KvmError(errno.ENOMEM, "mmap", "guest_memfd storage could not be created")
    with contextlib.ExitStack() as stack:
        source = storage.fd if hostmm.host_may_touch(file) else stack.enter_context(empty_fd())
        mapping = _map(file, storage, source, fd, length, offset, shared)
    return mapping


def _map(
    file: GmemFile, storage: GmemStorage, source: int, fd: int, length: int, offset: int, shared: bool
) -> GmemMapping:
    raw = c_mmap(None, length, PROT_RW, mmap.MAP_SHARED | MAP_NORESERVE, source, offset)  # the generic checks
    try:
        file.mmap(shared)
        mapper = SimMapper(file, storage)
        mapping = GmemMapping.reserve(length, offset, fd, mapper)
    finally:
        _munmap(raw, length)
    # The file reference first: taking the VM's slots_lock under the storage lock would invert the order
    # of punch and poison (slots_lock, then mmu lock, then storage lock).
    file.get()
    try:
        with storage.lock:  # no poison or heal may slip between placing the pages and registering the mapping
            mapping.place(0, length, source, offset)
            poisoned = [p for p in sorted(storage.poisoned) if offset <= p * uapi.PAGE_SIZE < offset + length]
            if mapper.accessible and poisoned:
                with empty_fd() as empty:
                    for pgoff in poisoned:
                        at = pgoff * uapi.PAGE_SIZE
                        mapping.place(at - offset, uapi.PAGE_SIZE, empty, at)
            storage.mappings.add(mapping)
    except BaseException:
        mmap.mmap.close(mapping)
        file.put()
        raise
    mapper.finalizer = weakref.finalize(mapping, _put_file, file)
    return mapping


def _munmap(address: int, length: int) -> None:
    munmap(address, length)
