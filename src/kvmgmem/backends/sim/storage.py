"""The bytes of a guest_memfd inode: one anonymous ``MAP_SHARED|MAP_NORESERVE`` mapping the size of the file.

Why one mapping with a stable address: the sim CPU maps each backing store into unicorn once, zero-copy
(design.md §2); host page faults materialise memory lazily, so a 1 TiB file costs nothing until touched.
Why raw ``mmap(2)`` through ctypes instead of ``mmap.mmap``: the storage must be unmapped exactly when the
inode dies even if a ctypes view of it exists elsewhere (Python's mmap refuses to close while exported), and
the kernel's MADV_REMOVE is what "punch hole" means for shared anonymous memory (plain MADV_DONTNEED would
keep the data).

Invariant kept for the model (``core/gmem.py``): a page the model calls absent reads as zero here.
"""

from __future__ import annotations

import ctypes
import mmap

from kvmgmem import uapi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_NORESERVE = 0x4000
_MADV_REMOVE = 9
#: Files larger than this get no storage (address space is 128 TiB); guest accesses then fail with ENOMEM.
MAX_STORAGE = 1 << 45


class GmemStorage:
    """Implements ``core.gmem.Backing`` over a raw shared anonymous mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.base: int | None = None
        if size <= MAX_STORAGE:
            addr = _libc.mmap(
                None,
                size,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                -1,
                0,
            )
            if addr is not None and addr != _MAP_FAILED:
                self.base = addr

    def address(self, pgoff: int) -> int | None:
        if self.base is None:
            return None
        return self.base + pgoff * uapi.PAGE_SIZE

    def discard(self, first: int, last: int) -> None:
        if self.base is None:
            return
        last = min(last, self.size // uapi.PAGE_SIZE)
        if last <= first:
            return
        addr, length = self.base + first * uapi.PAGE_SIZE, (last - first) * uapi.PAGE_SIZE
        if _libc.madvise(addr, length, _MADV_REMOVE) != 0:  # pragma: no cover - shmem supports it
            ctypes.memset(addr, 0, length)

    def release(self) -> None:
        if self.base is not None:
            _libc.munmap(self.base, self.size)
            self.base = None

    # byte access for host mmaps (callers check page state first)

    def read(self, offset: int, length: int) -> bytes:
        assert self.base is not None and 0 <= offset and offset + length <= self.size
        return ctypes.string_at(self.base + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        assert self.base is not None and 0 <= offset and offset + len(data) <= self.size
        ctypes.memmove(self.base + offset, data, len(data))
