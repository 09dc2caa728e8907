"""``GmemMapping``: a host mapping of a guest_memfd, the same type on every backend.

Why one class: code written against one backend must run on the other. So both backends hand out a real
``MAP_SHARED`` mapping that *is* an ``mmap.mmap`` (buffer protocol, slicing with steps, ``find``, ``madvise``,
``read``/``write`` at the file position) with a stable ``address``, an idempotent ``close()`` that memslots
can pin (EBUSY while one uses it), and the kernel's answers — including a real SIGBUS where the kernel's
``kvm_gmem_fault_user_mapping`` gives one (beyond EOF, private memory, hwpoison).

How: the object first reserves its address range (private, ``MAP_NORESERVE`` and never touched: no commit
charge, so a 64 GiB mapping is not refused by overcommit), then the backend puts the real pages there with
``MAP_FIXED`` (kvm: the guest_memfd itself, moved in with ``mremap``; sim: page ranges of its storage memfd,
and an empty memfd where the kernel would SIGBUS). ``mmap.mmap.close`` unmaps the whole range either way.

Errors of ``madvise`` are ``KvmError`` with op "madvise" and the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable
from typing import Any, Protocol

from kvmgmem.errors import KvmError
from kvmgmem.hostmem import PinnedMapping, place_aligned_reservation
from kvmgmem.libc import (
    MAP_FIXED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_RW,
    c_mmap,
    failed,
    mremap,
    munmap,
)


class MappingBackend(Protocol):
    """What a backend adds to a mapping: advice the kernel handles in guest_memfd terms, and unmap bookkeeping."""

    def madvise(self, mapping: GmemMapping, option: int, start: int, length: int) -> bool:
        """Handle ``option`` itself (True) or let the host kernel do it on the mapping (False)."""

    def unmap(self, mapping: GmemMapping, munmap: Callable[[], None]) -> None:
        """Run ``munmap`` (``close()``) under the backend's lock, then drop what the mapping held.

        The lock keeps any re-pointing of the mapping's pages from racing with the unmap; garbage collection
        is the backend's finalizer.
        """


class GmemMapping(PinnedMapping):
    """A ``MAP_SHARED`` read/write mapping of ``length`` bytes of a guest_memfd from file ``offset``.

    Attributes: ``address`` (first byte, 2 MiB-aligned from 2 MiB up like ``HostMemory``), ``size``
    (= ``len()``), ``offset`` (file offset), ``fd`` (the guest_memfd's fd at mapping time). May extend past
    EOF, as the kernel allows; touching such pages raises SIGBUS like any mapping of the kernel's guest_memfd
    does. Memslot pins, ``close()`` and ``with`` follow ``HostMemory``'s rules (``hostmem.PinnedMapping``).
    """

    offset: int
    fd: int
    _backend: MappingBackend | None

    @classmethod
    def reserve(cls, length: int, offset: int, fd: int, backend: MappingBackend | None = None) -> GmemMapping:
        """Reserve a range owned by a new object, for the backend to cover entirely with ``MAP_FIXED`` mappings.

        Private and ``MAP_NORESERVE``: never touched before it is replaced, so it costs no commit charge.
        """
        try:
            self = place_aligned_reservation(cls, length)
        except OverflowError:
            raise KvmError(errno.ENOMEM, "mmap", f"length {length:#x} exceeds the address space") from None
        except OSError as e:
            raise KvmError(e.errno or errno.ENOMEM, "mmap", f"cannot reserve {length:#x} bytes") from None
        self._init_tracking()
        self.offset = offset
        self.fd = fd
        self._backend = backend
        return self

    @classmethod
    def of_fd(cls, fd: int, length: int, offset: int = 0, shared: bool = True) -> GmemMapping:
        """Map a kernel guest_memfd.

        ``mmap(2)`` it (so every errno is the kernel's, in its order), then move the mapping onto a reserved
        object with ``mremap(MREMAP_FIXED)``.
        """
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        raw = c_mmap(None, length, PROT_RW, flags, fd, offset)
        try:
            self = cls.reserve(length, offset, fd)
        except BaseException:
            munmap(raw, length)
            raise
        moved = mremap(raw, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, self.address)
        if failed(moved):
            err = ctypes.get_errno()
            munmap(raw, length)
            mmap.mmap.close(self)
            raise KvmError(err, "mmap", "mremap onto the owning object failed")
        return self

    def place(self, start: int, length: int, fd: int, file_offset: int) -> None:
        """Backend use: map ``fd`` at ``file_offset`` over mapping bytes ``[start, start+length)``.

        ``start``, ``length`` and ``file_offset`` are bytes, multiples of 4096; the range must lie inside the
        mapping (a backend's job: nothing checks it here). It is ``mmap(2)`` with ``MAP_FIXED|MAP_SHARED``.
        Errors: ``KvmError`` (op "mmap") with its errno — EINVAL for an unaligned ``start`` or ``file_offset`` or a
        zero length, EBADF for a bad ``fd``, ENODEV for a file that cannot be mapped.

        >>> import os
        >>> from kvmgmem.gmem_mapping import GmemMapping
        >>> fd = os.memfd_create("example")
        >>> os.ftruncate(fd, 8192)
        >>> m = GmemMapping.reserve(8192, 0, fd)           # the object's address range, still anonymous
        >>> m.place(4096, 4096, fd, 0)                       # second page: the file's first
        >>> os.pwrite(fd, b"hi", 0), bytes(m[4096:4098])
        (2, b'hi')
        >>> m.close(); os.close(fd)
        """
        c_mmap(self.address + start, length, PROT_RW, mmap.MAP_SHARED | MAP_FIXED, fd, file_offset)

    def _unmap(self) -> None:
        if self._backend is not None:
            self._backend.unmap(self, lambda: mmap.mmap.close(self))
        else:
            mmap.mmap.close(self)

    def resize(self, newsize: int) -> None:
        """Refused: a guest_memfd mapping keeps its size (mremap would move it under a memslot).

        ``newsize`` is ignored. Errors: always ``KvmError(EINVAL)`` with op "mremap"; map a new range with
        ``GuestMemfd.mmap`` instead.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     with vm.create_guest_memfd(1 << 20, kvmgmem.GUEST_MEMFD_FLAG_MMAP) as gmem, gmem.mmap() as view:
        ...         try:
        ...             view.resize(2 << 20)
        ...         except kvmgmem.KvmError as e:
        ...             print(e)
        mremap failed: EINVAL (Invalid argument): a guest_memfd mapping cannot be resized
        """
        raise KvmError(errno.EINVAL, "mremap", "a guest_memfd mapping cannot be resized")

    # --- madvise ---------------------------------------------------------------------------------------

    def madvise(self, option: int, start: int = 0, length: int | None = None) -> None:
        """``madvise(2)`` on ``[start, start+length)`` (default: to the end), with guest_memfd's rules.

        ``option`` is an ``mmap.MADV_*`` value; ``start`` and ``length`` are bytes of the mapping (``start`` a
        multiple of 4096). MADV_REMOVE punches the file (the data is freed, as ``GuestMemfd.punch_hole``),
        MADV_DONTNEED drops the mapping's pages but keeps the file's data. Errors, ``KvmError`` with op
        "madvise": EINVAL for MADV_COLLAPSE (guest_memfd never collapses into huge folios), MADV_FREE (only for
        anonymous memory), unknown advice or an unaligned start; ValueError once the mapping is closed or for a
        ``start`` outside it (``mmap``'s own check; a length past the end is cut to the end).

        >>> import errno, mmap, kvmgmem
        >>> flags = kvmgmem.GUEST_MEMFD_FLAG_MMAP | kvmgmem.GUEST_MEMFD_FLAG_INIT_SHARED
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20, flags) as gmem:
        ...     with gmem.mmap() as view:
        ...         view[0:1] = b"x"
        ...         view.madvise(mmap.MADV_REMOVE, 0, 4096)
        ...         (gmem.allocated_bytes(), view[0])     # freed; reading faults in a zero page
        ...         try:
        ...             view.madvise(mmap.MADV_FREE)
        ...         except kvmgmem.KvmError as e:
        ...             print(errno.errorcode[e.errno])
        (0, 0)
        EINVAL
        """
        if self.closed:
            raise ValueError("madvise on a closed GmemMapping")
        if length is None:
            length = max(0, len(self) - start)
        if self._backend is not None and self._backend.madvise(self, option, start, length):
            return
        try:
            super().madvise(option, start, length)
        except OSError as e:
            raise KvmError(e.errno or errno.EINVAL, "madvise", f"advice {option}") from None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"address={self.address:#x} length={len(self):#x} offset={self.offset:#x}"
        return f"<GmemMapping fd={self.fd} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("a GmemMapping cannot be pickled")
