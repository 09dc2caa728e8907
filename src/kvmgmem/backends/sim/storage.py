"""The bytes of a guest_memfd inode: a memfd the size of the file (or anonymous memory, below), and the host
mappings that alias it.

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

Why a file no host mapping can reach (not INIT_SHARED) lives in anonymous memory instead (``anonymous``): its
only view is the sim's own, so nothing needs the pages shared, and private anonymous pages are much cheaper
for the host to provide. The first touch of a page costs the host a page fault that allocates, zeroes and
maps it, and on a host that runs under shadow paging that is dear: 3.0 µs per page for a memfd, 1.9 for
anonymous memory (thread CPU time, this host). So that memory is also populated ahead, in aligned groups of
``AHEAD_PAGES``, when the model allocates a page in one (``MADV_POPULATE_WRITE``: no exception per page;
1.4 µs per page for 16-page groups, 1.36 for 64; a memfd populated so costs 2.6). Bench 8's first touch went
from 10.3 to about 8 µs with both. The model still allocates, counts and punches page by page; a punch frees
the host pages (``MADV_DONTNEED``), and a group punched whole is populated again by its next allocation. The
cost is host memory: a guest touching one page per group holds ``AHEAD_PAGES`` times what the model counts,
so groups stay small (64 KiB: 16 pages gave nearly all the gain of 64). The mapping is ``MADV_DONTFORK`` (a
child process never shares or copies guest memory, as with the memfd it never ran the sim) and
``MADV_NOHUGEPAGE`` (one 4 KiB allocation never becomes 2 MiB of host memory). A host that refuses the
mapping (strict overcommit) gets a memfd, as before.

Invariant kept for the model (``core/gmem.py``): a page the model calls absent reads as zero here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.libc import (
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_NOHUGEPAGE,
    MADV_POPULATE_WRITE,
    MAP_NORESERVE,
    PROT_RW,
    c_mmap,
    fallocate,
    madvise,
    madvise_held,
    munmap,
)

if TYPE_CHECKING:
    from kvmgmem.gmem_mapping import GmemMapping

#: Files up to this size get one whole-file view (address space is 128 TiB); larger ones use chunks.
MAX_STORAGE = 1 << 45
#: Size of one lazily mapped piece of the sim's view of a larger file.
CHUNK = 1 << 30
#: Pages made resident together when the model allocates one of them in anonymous storage: 64 KiB groups.
AHEAD_SHIFT = 4
AHEAD_PAGES = 1 << AHEAD_SHIFT
_FALLOC_PUNCH = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
_ANON_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
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
    """Implements ``core.gmem.Backing`` over a memfd; tracks the live user mappings of the file.

    ``anonymous`` (asked for a file no user mapping can reach): anonymous memory populated ahead (module
    docstring); it stays False when the host refuses the mapping. ``resident`` marks its groups populated
    since they were last punched whole.
    """

    def __init__(self, size: int, anonymous: bool = False) -> None:
        self.size = size
        self.anonymous = False
        self.resident: set[int] = set()  # group numbers: pgoff >> AHEAD_SHIFT
        self.fd = -1
        self.base: int | None = None
        self.lock = threading.RLock()  # serialises mapping creation, re-pointing and unmapping
        self.mappings: weakref.WeakSet[GmemMapping] = weakref.WeakSet()
        self.poisoned: set[int] = set()
        self._chunks: dict[int, int] = {}  # chunk index -> address (files larger than MAX_STORAGE)
        self.chunk_listeners: list[Callable[[int, int], None]] = []  # (address, size) of a new chunk
        if anonymous:
            try:
                self.base = _map_anonymous(size) if size <= MAX_STORAGE else None
            except OSError:
                pass  # e.g. strict overcommit: a memfd, as for any other file
            else:
                self.anonymous = True
                return
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
        if self.fd < 0 and not self.anonymous:
            return None
        offset = pgoff * uapi.PAGE_SIZE
        index = offset // CHUNK
        with self.lock:
            chunk = self._chunks.get(index)
            if chunk is None:
                length = min(CHUNK, self.size - index * CHUNK)
                try:
                    if self.anonymous:
                        chunk = _map_anonymous(length)
                    else:
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
        if self.base is not None or (self.fd < 0 and not self.anonymous):
            return
        end = min(offset + length, self.size)
        for index in range(offset // CHUNK, -(-end // CHUNK)):
            self.address(index * CHUNK // uapi.PAGE_SIZE)

    def prepare(self, pgoff: int) -> None:
        """The model allocated page ``pgoff``: in anonymous storage, make its group resident
        (``MADV_POPULATE_WRITE``) unless it is marked already (its pages are resident, or were punched and fault
        in on touch). A failure (ENOMEM; EINVAL before Linux 5.14) leaves the pages to the first touch."""
        group = pgoff >> AHEAD_SHIFT
        if not self.anonymous or group in self.resident:
            return
        with self.lock:  # marking and populating are one step against discard()'s unmarking
            if group in self.resident:
                return
            first = group << AHEAD_SHIFT
            address = self.address(first)
            if address is None:
                return
            length = min(AHEAD_PAGES, self.size // uapi.PAGE_SIZE - first) * uapi.PAGE_SIZE
            if madvise_held(address, length, MADV_POPULATE_WRITE) == 0:  # 64 KiB under mmu_lock: keep the GIL (_punch)
                self.resident.add(group)

    def discard(self, first: int, last: int) -> None:
        """PUNCH_HOLE on the memfd (``MADV_DONTNEED`` on anonymous storage): the pages are freed and unmapped
        from every mapping; poisoned pages in the range are healed (the kernel frees them with the folio), so
        their user mappings are re-pointed. A group populated ahead that the range covers whole is unmarked;
        one it covers in part stays marked (its other pages are resident)."""
        npages = self.size // uapi.PAGE_SIZE
        last = min(last, npages)
        if last <= first or (self.fd < 0 and not self.anonymous):
            return
        if not self.anonymous:
            _punch(self.fd, first * uapi.PAGE_SIZE, (last - first) * uapi.PAGE_SIZE)
        with self.lock:
            if self.anonymous:
                for address, length in self._views(first, last):
                    advise = madvise_held if length <= HELD_PUNCH else madvise  # as _punch, for the same reason
                    if advise(address, length, MADV_DONTNEED) != 0:  # pragma: no cover - own, aligned mapping
                        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) of guest_memfd storage")
                if self.resident:
                    self._unmark(first, last, npages)
            healed = sorted(p for p in self.poisoned if first <= p < last)
            for pgoff in healed:
                self.poisoned.discard(pgoff)
                self._repoint(pgoff, pgoff + 1, self.fd)

    def _views(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """(address, length) of the mapped parts of pages ``[first, last)`` (caller holds ``lock``)."""
        lo, hi = first * uapi.PAGE_SIZE, last * uapi.PAGE_SIZE
        if self.base is not None:
            yield self.base + lo, hi - lo
            return
        for index, chunk in self._chunks.items():
            start, end = max(lo, index * CHUNK), min(hi, (index + 1) * CHUNK, self.size)
            if start < end:
                yield chunk + start - index * CHUNK, end - start

    def _unmark(self, first: int, last: int, npages: int) -> None:
        """Forget the groups ``[first, last)`` covers whole (the file's last group may be short)."""
        lo = -(-first >> AHEAD_SHIFT)
        hi = -(-last >> AHEAD_SHIFT) if last == npages else last >> AHEAD_SHIFT
        if hi - lo <= len(self.resident):
            self.resident.difference_update(range(lo, hi))
        else:
            self.resident = {g for g in self.resident if not lo <= g < hi}

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
        """Page ranges the memfd holds data for (``SEEK_DATA``/``SEEK_HOLE``): what host accesses touched.
        None for anonymous storage: no host mapping reaches it, and the sim's own view holds only pages the
        model allocated (and the groups populated ahead, which accounting must not see)."""
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


def _map_anonymous(length: int) -> int:
    """A private anonymous view of ``length`` bytes for the sim (module docstring): not inherited by a child,
    never backed by huge pages."""
    address = c_mmap(None, length, PROT_RW, _ANON_FLAGS, -1, 0)
    madvise(address, length, MADV_DONTFORK)
    madvise(address, length, MADV_NOHUGEPAGE)  # EINVAL without THP support: nothing to avoid then
    return address
