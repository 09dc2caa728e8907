"""Host memory handed to memslots: stable addresses that stay mapped while a memslot uses them.

KVM only ever sees a ``userspace_addr``; if Python frees the buffer behind it while a memslot points there,
the real kernel copes but the sim (which maps the same bytes into unicorn) would crash the interpreter. So a
memslot *pins* its host memory: ``HostMemory.close()`` is refused while any memslot uses it, and plain
buffers are held through a ctypes export, which makes ``mmap.close()``/``bytearray`` resizing fail as well.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
import threading
from collections.abc import Callable
from typing import Any

from kvmgmem.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

_MAP_FAILED = ctypes.c_void_p(-1).value
_MREMAP_MAYMOVE = 1
_MREMAP_FIXED = 2
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE


def buffer_address(buf: Any) -> int:
    """Address of a writable buffer's first byte (the buffer must stay alive while the address is used)."""
    holder = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


class Pins:
    """Memslot pins of a piece of host memory: who uses it, and the lock ``close()`` checks them under.

    Shared by ``HostMemory`` and the sim's guest_memfd mapping, so "memory a memslot uses cannot be unmapped"
    is one rule: ``close()`` is refused with EBUSY while pinned, a pin on closed memory fails with EFAULT.
    """

    __slots__ = ("_lock", "_pins")

    def __init__(self) -> None:
        self._pins: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()

    def pin(self, key: tuple[int, int], what: str, is_closed: Callable[[], bool]) -> None:
        """Pin unless the memory is already closed (checked under the lock ``close`` takes: no race)."""
        with self._lock:
            if is_closed():
                raise KvmError(errno.EFAULT, what, "host memory is closed")
            self._pins[key] = what

    def unpin(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._pins.pop(key, None)

    def users(self) -> list[str]:
        with self._lock:
            return list(self._pins.values())

    def close_if_unpinned(self, op: str, unmap: Callable[[], None]) -> None:
        """Run ``unmap`` unless a memslot still uses the memory (then EBUSY, naming the users)."""
        with self._lock:
            if self._pins:
                raise KvmError(errno.EBUSY, op, f"still used by {', '.join(sorted(self._pins.values()))}")
            unmap()


class HostMemory(mmap.mmap):
    """An anonymous ``MAP_SHARED`` read/write mapping with a stable ``address``.

    It *is* an ``mmap.mmap`` (buffer protocol, slicing, ``madvise``), plus: ``address``, ``size``, and pinning by
    memslots so it cannot be unmapped under a running guest.
    """

    address: int
    _pins: Pins

    def __new__(cls, size: int) -> HostMemory:
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"HostMemory: size must be an int, not {type(size).__name__}")
        if not 0 < size <= sys.maxsize:
            raise ValueError(f"HostMemory: size must be in 1..{sys.maxsize}, got {size}")
        try:
            self = super().__new__(cls, -1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, prot=_PROT_RW)
        except OSError as e:
            raise KvmError(e.errno or errno.ENOMEM, "HostMemory", f"cannot map {size} bytes") from None
        self._init_tracking()
        return self

    def _init_tracking(self) -> None:
        self.address = buffer_address(self)
        self._pins = Pins()

    @property  # the contract: ``.size`` is an attribute (mmap's size() method is shadowed)
    def size(self) -> int:  # type: ignore[override]
        return len(self)

    # --- pinning by memslots ---------------------------------------------------------------------------

    def _pin(self, key: tuple[int, int], what: str) -> None:
        self._pins.pin(key, what, lambda: self.closed)

    def _unpin(self, key: tuple[int, int]) -> None:
        self._pins.unpin(key)

    @property
    def pinned_by(self) -> list[str]:
        """Descriptions of the memslots currently using this memory."""
        return self._pins.users()

    def close(self) -> None:
        """Unmap. Idempotent; refused (EBUSY) while a memslot still uses the memory."""
        if not self.closed:
            self._pins.close_if_unpinned("HostMemory.close", super().close)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"address=0x{self.address:x}"
        return f"<{type(self).__name__} size={len(self) if not self.closed else '?'} {state}>"

    # ``mmap.mmap`` has a C-level __enter__/__exit__; keep them but route exit through our close().
    def __exit__(self, *exc: object) -> None:
        self.close()


class FileMapping(HostMemory):
    """A ``MAP_SHARED``/``MAP_PRIVATE`` mapping of a file (a guest_memfd) with the same interface.

    Python's own ``mmap.mmap(fd, ...)`` refuses lengths beyond a regular file's size, but the spec
    (§2.10, GM-6) needs mappings that extend past EOF. So we reserve an anonymous ``HostMemory`` and move a
    raw ``mmap(2)`` of the file onto it with ``mremap(MREMAP_FIXED)``: the kernel's own errors come back
    unchanged and the Python object still owns, tracks and unmaps the range.
    """

    def __new__(cls, fd: int, length: int, offset: int = 0, shared: bool = True) -> FileMapping:
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        raw = _libc.mmap(None, length, _PROT_RW, flags, fd, offset)
        if raw is None or raw == _MAP_FAILED:
            err = ctypes.get_errno()
            raise KvmError(err, "mmap", f"guest_memfd fd {fd}, length {length}, offset {offset}")
        try:
            self = mmap.mmap.__new__(cls, -1, length, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, prot=_PROT_RW)
        except BaseException:
            _libc.munmap(raw, length)
            raise
        target = buffer_address(self)
        moved = _libc.mremap(raw, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, target)
        if moved is None or moved == _MAP_FAILED:
            err = ctypes.get_errno()
            _libc.munmap(raw, length)
            mmap.mmap.close(self)
            raise KvmError(err, "mmap", "mremap onto the owning object failed")
        self._init_tracking()
        self.fd = fd
        self.offset = offset
        return self

    fd: int
    offset: int


_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_MINCORE_CHUNK = 1 << 30  # bytes per mincore call, to bound the vector we allocate


def resident_bytes(address: int, length: int) -> int:
    """Bytes of ``[address, address+length)`` resident in memory, measured with ``mincore(2)``.

    Used for the accounting of both stores of a RAM region: shared anonymous memory is shmem, so a page
    discarded with MADV_REMOVE really reports non-resident; for a file mapping mincore reports the file's
    page cache, so a guest_memfd mapping shows the file's allocated pages without touching them.
    """
    page = mmap.PAGESIZE
    total = 0
    for start in range(address, address + length, _MINCORE_CHUNK):
        span = min(_MINCORE_CHUNK, address + length - start)
        vec = (ctypes.c_ubyte * ((span + page - 1) // page))()
        if _libc.mincore(start, span, vec) != 0:
            raise KvmError(ctypes.get_errno(), "mincore")
        total += sum(v & 1 for v in bytes(vec)) * page
    return total
