"""``GuestMemfd`` on the sim: file operations with the kernel's errnos, over ``core.gmem``.

Why an adapter: the core models state; this layer owns the real resources (a real fd number, the storage
mapping via the core's Backing) and turns Python arguments into the C-level values a caller would pass.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, as_uint, bytes_arg, count_arg, signed64, u64
from kvmgmem.errors import KvmError

from . import fdtable
from .core.gmem import GmemFile
from .mapping import GmemMapping

if TYPE_CHECKING:
    from .vm import SimVm


_TASK_SIZE = 1 << 47  # x86-64 user address space: longer mappings fail with ENOMEM


class SimGuestMemfd(GuestMemfd):
    """A sim guest_memfd. Extra (sim-only): ``inject_poison``, ``sim`` (the core file), ``introspect``."""

    def __init__(self, vm: SimVm, file: GmemFile) -> None:
        self.vm = vm
        self.size = file.inode.size
        self.flags = file.inode.flags
        self._file = file
        self._fd = fdtable.gmem_fd(self.size)
        fdtable.register(self._fd, file)
        self._finalizer = weakref.finalize(self, fdtable.close_gmem_fd, self._fd, file)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def sim(self) -> GmemFile:
        """The model's file object (inode via ``.inode``)."""
        return self._file

    def _release(self) -> None:
        self._finalizer()

    def allocated_bytes(self) -> int:
        """Bytes of the file backed by pages now (the model's count of present pages)."""
        return self._file.inode.nr_present * uapi.PAGE_SIZE

    # --- fallocate ------------------------------------------------------------------------------------------

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        op = "fallocate"
        self._check_open(op)
        mode = as_uint(mode, 32, "mode", op)
        self._file.vm.gmem_fallocate(self._file, mode, u64(offset, "offset", op), u64(length, "length", op))

    def inject_poison(self, offset: int) -> None:
        """Sim-only: a memory failure on the page holding file ``offset`` (§2.15): zap its guest mappings,
        mark it hwpoisoned (guest access → EHWPOISON exit, host access → SigBus), no truncation."""
        op = "inject_poison"
        self._check_open(op)
        off = signed64(u64(offset, "offset", op))
        if off < 0:
            raise KvmError(errno.EINVAL, op, "negative offset")
        self._file.vm.gmem_poison(self._file, off >> uapi.PAGE_SHIFT)

    # --- mmap -----------------------------------------------------------------------------------------------

    def mmap(self, length: int | None = None, offset: int = 0, shared: bool = True) -> GmemMapping:
        """6.18+: needs GUEST_MEMFD_FLAG_MMAP (else ENODEV); MAP_PRIVATE → EINVAL. The mapping may extend
        past EOF; see ``mapping.GmemMapping`` for per-access SIGBUS (``SigBus``) rules."""
        op = "mmap"
        self._check_open(op)
        length = self.size if length is None else u64(length, "length", op)
        offset = u64(offset, "offset", op)
        if length == 0 or offset % uapi.PAGE_SIZE or signed64(offset) < 0:
            raise KvmError(errno.EINVAL, op, "length 0 or offset not page aligned")
        if length > _TASK_SIZE:
            raise KvmError(errno.ENOMEM, op, f"length {length:#x} exceeds the user address space")
        inode = self._file.inode
        if not (self._file.vm.profile.gmem_flags and inode.mmap_allowed):
            raise KvmError(errno.ENODEV, op, "guest_memfd was not created with GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise KvmError(errno.EINVAL, op, "guest_memfd can only be mapped MAP_SHARED")
        if inode.backing.address(0) is None:
            raise KvmError(errno.ENOMEM, op, "guest_memfd storage could not be mapped")
        return GmemMapping(self._file, length, offset)

    # --- file operations guest_memfd does not have (§2.9, §2.11; errnos as measured on 6.18) -----------------

    def read(self, n: int) -> bytes:
        count_arg(n, "n", "read")
        self._check_open("read")
        raise KvmError(errno.EINVAL, "read", "guest_memfd has no read operation")

    def write(self, data: bytes) -> int:
        bytes_arg(data, "write")
        self._check_open("write")
        raise KvmError(errno.EINVAL, "write", "guest_memfd has no write operation")

    def pread(self, n: int, offset: int) -> bytes:
        count_arg(n, "n", "pread")
        self._check_open("pread")
        if signed64(u64(offset, "offset", "pread")) < 0:
            raise KvmError(errno.EINVAL, "pread", "negative offset")
        raise KvmError(errno.ESPIPE, "pread", "guest_memfd is not seekable")

    def pwrite(self, data: bytes, offset: int) -> int:
        bytes_arg(data, "pwrite")
        self._check_open("pwrite")
        if signed64(u64(offset, "offset", "pwrite")) < 0:
            raise KvmError(errno.EINVAL, "pwrite", "negative offset")
        raise KvmError(errno.ESPIPE, "pwrite", "guest_memfd is not seekable")

    def truncate(self, length: int) -> None:
        u64(length, "length", "ftruncate")
        self._check_open("ftruncate")
        raise KvmError(errno.EINVAL, "ftruncate", "guest_memfd is not resizable")

    def stat(self) -> os.stat_result:
        self._check_open("fstat")
        st = os.fstat(self._fd)
        # The kernel's anon inode has one link (``alloc_anon_secure_inode``); the memfd standing in for it
        # reports 0 (unlinked shmem). Everything else (size, mode, blksize, a unique st_ino) is the memfd's.
        fields = list(st)
        fields[stat.ST_NLINK] = 1
        extra = {name: getattr(st, name) for name in dir(st) if name.startswith("st_")}
        return os.stat_result(fields, extra)

    def introspect(self) -> dict[str, object]:
        """Page states of the inode: runs of (first, last, state)."""
        inode = self._file.inode
        with self._file.vm.mmu.lock:
            return {
                "ino": inode.ino,
                "size": inode.size,
                "pages": [(a, b, v) for a, b, v in inode.pages.pieces(0, inode.npages)],
                "pages_present": inode.nr_present,
                "pages_allocated": inode.pages_allocated,
                "pages_freed": inode.pages_freed,
                "refs": self._file.refs,
            }
