"""The bytes of a guest_memfd inode: a memfd the size of the file, and the host mappings that alias it.

Why a memfd: every view of the file must be the *same* pages, as in the kernel where the guest, the host
mmap and fallocate all work on the inode's page cache. The sim's own view (``base``, mapped once into
unicorn, zero-copy) and every user ``GmemMapping`` are ``MAP_SHARED`` mappings of this memfd,
so host writes are what the guest reads, PUNCH_HOLE (``fallocate`` on the memfd) frees the pages and zaps
every mapping of them at once, and pages are materialised lazily (a 1 TiB file costs nothing until touched).

Why user mappings are re-pointed page range by page range: where the kernel's
``kvm_gmem_fault_user_mapping`` answers SIGBUS (a file that is not INIT_SHARED, i.e. private memory;
a hwpoisoned page; beyond EOF) the host must get a real SIGBUS and never the bytes. Beyond EOF the memfd
itself SIGBUSes (it has the file's size). Private files and poisoned pages are mapped from an *empty* memfd
instead, whose every page is beyond its EOF; when a page's state changes (poisoned, or punched and so
healed), every live user mapping of it is re-pointed, as the kernel zaps user mappings on such changes.

Files up to ``MAX_STORAGE`` get one whole-file ``base`` mapping; larger ones (the kernel allows up to
2^63-4096, sparsely) are mapped into the sim's view lazily, one ``CHUNK`` at a time, on first use.

Invariant kept for the model (``core/gmem.py``): a page the model calls absent reads as zero here.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.libc import MAP_NORESERVE, PROT_RW, c_mmap, munmap

from ..kvm.sys_calls import fallocate

if TYPE_CHECKING:
    from kvmgmem.gmem_mapping import GmemMapping

#: Files up to this size get one whole-file view (address space is 128 TiB); larger ones use chunks.
MAX_STORAGE = 1 << 45
#: Size of one lazily mapped piece of the sim's view of a larger file.
CHUNK = 1 << 30
_FALLOC_PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
#: Punches up to this size keep the GIL across the syscall (``_punch``).
HELD_PUNCH = 2 << 20


def _punch(fd: int, offset: int, length: int) -> None:
    """PUNCH_HOLE on the memfd; up to ``HELD_PUNCH`` bytes without releasing the GIL.

    Why: the model truncates under ``mmu_lock`` (its Python readers cannot use RCU), and a vCPU's fault takes
    that lock. A plain ctypes call drops the GIL for the syscall (a few µs for a 4 KiB page); other vCPU
    threads then run, fault, find ``mmu_lock`` held and sleep on it, and the puncher itself waits for the
    GIL before it can drop the lock: bench 7's implicit conversions with 4 vCPUs hit that on every third
    conversion. A large punch still releases the GIL (freeing GiBs takes milliseconds, and guest code of
    other vCPUs need not wait for it)."""
    fallocate(fd, _FALLOC_PUNCH, offset, length, hold_gil=length <= HELD_PUNCH)


@contextlib.contextmanager
def empty_fd() -> Iterator[int]:
    """A memfd of size 0, to map where the kernel would SIGBUS (every page is beyond its EOF). A fresh one
    each time, closed at once: the mappings keep it alive, and no fd outlives them."""
    fd = os.memfd_create("kvm-gmem-sigbus", os.MFD_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


class GmemStorage:
    """Implements ``core.gmem.Backing`` over a memfd; tracks the live user mappings of the file."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = -1
        self.base: int | None = None
        self.lock = threading.RLock()  # serialises mapping creation, re-pointing and unmapping
        self.mappings: weakref.WeakSet[GmemMapping] = weakref.WeakSet()
        self.poisoned: set[int] = set()
        self._chunks: dict[int, int] = {}  # chunk index -> address (files larger than MAX_STORAGE)
        self.chunk_listeners: list[Callable[[int, int], None]] = []  # (address, size) of a new chunk
        try:
            fd = os.memfd_create("kvm-gmem-storage", os.MFD_CLOEXEC)
        except OSError:
            return
        try:
            os.ftruncate(fd, size)
            if size <= MAX_STORAGE:
                self.base = c_mmap(None, size, PROT_RW, mmap.MAP_SHARED | MAP_NORESERVE, fd, 0)
        except OSError:
            os.close(fd)
            return
        self.fd = fd

    def address(self, pgoff: int) -> int | None:
        if self.base is not None:
            return self.base + pgoff * uapi.PAGE_SIZE
        if self.fd < 0:
            return None
        offset = pgoff * uapi.PAGE_SIZE
        index = offset // CHUNK
        with self.lock:
            chunk = self._chunks.get(index)
            if chunk is None:
                length = min(CHUNK, self.size - index * CHUNK)
                try:
                    chunk = c_mmap(None, length, PROT_RW, mmap.MAP_SHARED | MAP_NORESERVE, self.fd, index * CHUNK)
                except OSError:
                    return None
                self._chunks[index] = chunk
                for listener in list(self.chunk_listeners):
                    listener(chunk, length)
        return chunk + offset - index * CHUNK

    def premap(self, offset: int, length: int) -> None:
        """Map the chunks of file bytes ``[offset, offset+length)`` now (a memslot binds them): the vCPUs'
        fault path then finds them mapped and registered as stores, and never has to register one itself
        (that waits for every vCPU's acknowledgement, the faulting one included)."""
        if self.base is not None or self.fd < 0:
            return
        end = min(offset + length, self.size)
        for index in range(offset // CHUNK, -(-end // CHUNK)):
            self.address(index * CHUNK // uapi.PAGE_SIZE)

    def discard(self, first: int, last: int) -> None:
        """PUNCH_HOLE on the memfd: the pages are freed and unmapped from every mapping; poisoned pages in
        the range are healed (the kernel frees them with the folio), so their user mappings are re-pointed."""
        if self.fd < 0:
            return
        last = min(last, self.size // uapi.PAGE_SIZE)
        if last <= first:
            return
        _punch(self.fd, first * uapi.PAGE_SIZE, (last - first) * uapi.PAGE_SIZE)
        with self.lock:
            healed = sorted(p for p in self.poisoned if first <= p < last)
            for pgoff in healed:
                self.poisoned.discard(pgoff)
                self._repoint(pgoff, pgoff + 1, self.fd)

    def poison(self, pgoff: int) -> None:
        """Memory failure on page ``pgoff``: host accesses SIGBUS from now on (live mappings re-pointed)."""
        with self.lock:
            if pgoff in self.poisoned:
                return
            self.poisoned.add(pgoff)
            with empty_fd() as fd:
                self._repoint(pgoff, pgoff + 1, fd)

    def _repoint(self, first: int, last: int, fd: int) -> None:
        """Map ``fd`` over file pages ``[first, last)`` in every live user mapping (caller holds ``lock``)."""
        for mapping in list(self.mappings):
            if mapping.unmapped or not getattr(mapping._backend, "accessible", False):
                continue
            lo = max(first * uapi.PAGE_SIZE, mapping.offset)
            hi = min(last * uapi.PAGE_SIZE, mapping.offset + len(mapping))
            if lo < hi:
                mapping.place(lo - mapping.offset, hi - lo, fd, lo)

    def populated(self) -> list[tuple[int, int]]:
        """Page ranges the memfd holds data for (``SEEK_DATA``/``SEEK_HOLE``): what host accesses touched."""
        out: list[tuple[int, int]] = []
        if self.fd < 0:
            return out
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            out.append((start // uapi.PAGE_SIZE, -(-end // uapi.PAGE_SIZE)))
            pos = end
        return out

    def release(self) -> None:
        """The inode died (no file, hence no user mapping, refers to it): unmap the view, close the memfd."""
        with self.lock:
            if self.base is not None:
                munmap(self.base, self.size)
                self.base = None
            for index, chunk in self._chunks.items():
                munmap(chunk, min(CHUNK, self.size - index * CHUNK))
            self._chunks.clear()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    def chunks(self) -> list[int]:
        with self.lock:
            return list(self._chunks.values())
