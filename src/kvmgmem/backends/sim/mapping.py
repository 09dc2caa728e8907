"""Host mmap of a sim guest_memfd (6.18+, spec §2.10), and ``SigBus``, the sim's stand-in for SIGBUS.

Why a wrapper and not a raw mmap: the kernel decides per page on every host access — beyond EOF → SIGBUS,
file not INIT_SHARED (private memory) → SIGBUS, hwpoisoned → SIGBUS, else materialise a zero page — and the
host must never read or write private memory. A real mmap of the storage could not refuse, so a
``GmemMapping`` checks each access against the model first, then copies from/to the storage bytes. Those are
the very bytes the guest uses, so host writes are visible to the guest and vice versa, and PUNCH_HOLE reads
back as zero.

Access is ``mmap``-like: ``m[i]``, ``m[a:b]``, ``m[a:b] = data``, ``len(m)``, ``madvise``, ``close()``.
"""

from __future__ import annotations

import errno
import weakref
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError
from kvmgmem.hostmem import Pins

from .core.gmem import GmemFile
from .storage import GmemStorage

MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


class SigBus(KvmError):
    """A host access through a guest_memfd mapping that the kernel answers with SIGBUS.

    Raised by ``GmemMapping`` reads/writes: ``offset`` is the file offset of the first byte that could not be
    accessed, ``reason`` one of "beyond EOF", "private (guest_memfd not INIT_SHARED)", "hwpoison". A write
    that raises has already stored every byte before ``offset`` (as a memset that dies on its first bad page
    has). ``errno`` is EFAULT, ``op`` "mmap access"; the real kernel would kill the process instead.
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(errno.EFAULT, "mmap access", f"SIGBUS at file offset {offset:#x}: {reason}")
        self.offset = offset
        self.reason = reason

    def __reduce__(self) -> Any:
        return (type(self), (self.offset, self.reason))


def _put_file(file: GmemFile) -> None:
    file.put()


class GmemMapping:
    """A ``MAP_SHARED`` mapping of ``length`` bytes of a guest_memfd from file ``offset`` (may pass EOF).

    Holds a reference on the file (an mmap pins the file, so closing the fd keeps the memory, §2.10.7)
    until ``close()`` (or garbage collection).
    """

    def __init__(self, file: GmemFile, length: int, offset: int) -> None:
        file.get()
        self._file = file
        self._storage: GmemStorage = file.inode.backing  # type: ignore[assignment]
        self._length = length
        self.offset = offset
        self._finalizer = weakref.finalize(self, _put_file, file)
        self._pins = Pins()  # memslots using this mapping as their userspace memory

    # --- lifetime -------------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """munmap. Idempotent; refused (EBUSY) while a memslot uses the mapping as its userspace memory."""
        if not self.closed:
            self._pins.close_if_unpinned("GmemMapping.close", self._finalizer)

    # pinning by memslots (the HostMemory protocol, see kvmgmem.hostmem.Pins)

    def _pin(self, key: tuple[int, int], what: str) -> None:
        if not self._file.inode.init_shared:
            raise KvmError(errno.EFAULT, what, "a private guest_memfd mapping cannot back a memslot's userspace")
        self._pins.pin(key, what, lambda: self.closed)

    def _unpin(self, key: tuple[int, int]) -> None:
        self._pins.unpin(key)

    def __enter__(self) -> GmemMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._length

    @property
    def size(self) -> int:
        return self._length

    @property
    def address(self) -> int:
        """Process address of the mapping's first byte, for zero-copy use of *shared* memory only.

        Raises ``SigBus`` for a private (not INIT_SHARED) file: no API hands out private memory."""
        self._check("address")
        if not self._file.inode.init_shared:
            raise SigBus(self.offset, "private (guest_memfd not INIT_SHARED)")
        base = self._storage.address(self.offset // uapi.PAGE_SIZE)
        assert base is not None
        return base

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"length={self._length:#x} offset={self.offset:#x}"
        return f"<GmemMapping ino={self._file.inode.ino} {state}>"

    # --- access ---------------------------------------------------------------------------------------------

    def _check(self, what: str) -> None:
        if self.closed:
            raise ValueError(f"GmemMapping.{what}: mapping is closed")

    def _span(self, key: int | slice) -> tuple[int, int, bool]:
        if isinstance(key, slice):
            start, stop, step = key.indices(self._length)
            if step != 1:
                raise ValueError("GmemMapping supports contiguous slices only")
            return start, max(start, stop), False
        index = key.__index__()
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("GmemMapping index out of range")
        return index, index + 1, True

    def _fault(self, start: int, stop: int) -> tuple[int, str | None]:
        """Host-fault the pages of mapping bytes ``[start, stop)``: returns (accessible end, reason)."""
        if stop <= start:
            return stop, None
        lo, hi = self.offset + start, self.offset + stop
        first, last = lo // uapi.PAGE_SIZE, -(-hi // uapi.PAGE_SIZE)
        page_stop, reason = self._file.vm.gmem_host_fault(self._file, first, last)
        if reason is None:
            return stop, None
        return max(start, min(stop, page_stop * uapi.PAGE_SIZE - self.offset)), reason

    def __getitem__(self, key: int | slice) -> Any:
        self._check("__getitem__")
        start, stop, single = self._span(key)
        ok, reason = self._fault(start, stop)
        if reason is not None:
            raise SigBus(self.offset + ok, reason)
        data = self._storage.read(self.offset + start, stop - start) if stop > start else b""
        return data[0] if single else data

    def __setitem__(self, key: int | slice, value: Any) -> None:
        self._check("__setitem__")
        start, stop, single = self._span(key)
        data = bytes([value]) if single else bytes(value)
        if len(data) != stop - start:
            raise IndexError("GmemMapping slice assignment is wrong size")
        ok, reason = self._fault(start, stop)
        if ok > start:
            self._storage.write(self.offset + start, data[: ok - start])
        if reason is not None:
            raise SigBus(self.offset + ok, reason)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at mapping ``offset`` (same as ``m[offset:offset+length]``)."""
        result: bytes = self[offset : offset + length]
        return result

    def write(self, offset: int, data: bytes) -> None:
        self[offset : offset + len(data)] = data

    def madvise(self, option: int, start: int = 0, length: int = 0) -> None:
        """MADV_COLLAPSE → EINVAL (guest_memfd never collapses into huge folios, §2.10.5); MADV_HUGEPAGE,
        MADV_DONTNEED and others are accepted (the data stays in the file)."""
        self._check("madvise")
        if option == MADV_COLLAPSE:
            raise KvmError(errno.EINVAL, "madvise", "MADV_COLLAPSE is not supported on guest_memfd")
