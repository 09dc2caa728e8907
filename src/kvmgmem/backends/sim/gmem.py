"""``GuestMemfd`` on the sim: file operations over ``core.gmem``, whose ``GmemFile`` decides their errnos.

Why an adapter: the core models state; this layer owns the real resources (a real fd number, the storage
mapping via the core's Backing) and turns Python arguments into the C-level values a caller would pass.
"""

from __future__ import annotations

import os
import stat
import weakref
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, u64
from kvmgmem.gmem_mapping import GmemMapping

from . import fdtable
from .core import hostmm
from .core.gmem import GmemFile
from .mapping import map_gmem

if TYPE_CHECKING:
    from .vm import SimVm


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
        """Bytes of the file backed by pages now (the model's count of present pages, after taking in the
        pages host accesses through mappings materialised, which the model does not see one by one)."""
        self._sync_host_touched()
        return self._file.inode.nr_present * uapi.PAGE_SIZE

    def _sync_host_touched(self) -> None:
        """Pages the host touched through a real mapping are in the storage memfd: the model counts them
        allocated (``hostmm.user_faults``)."""
        populated = getattr(self._file.inode.backing, "populated", None)
        if populated is not None:
            hostmm.user_faults(self._file, populated)

    # --- fallocate ------------------------------------------------------------------------------------------

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        self._file.vm.gmem_fallocate(self._file, mode, offset, length)

    def inject_poison(self, offset: int) -> None:
        """Sim-only: a memory failure on the page holding file ``offset`` (``kvm_gmem_error_folio``): zap its
        guest mappings, mark it hwpoisoned (guest access → EHWPOISON exit, host access → SIGBUS), no truncation."""
        op = "inject_poison"
        self._check_open(op)
        hostmm.memory_failure(self._file, u64(offset, "offset", op))

    # --- mmap -----------------------------------------------------------------------------------------------

    def _mmap(self, length: int, offset: int, shared: bool) -> GmemMapping:
        """6.18+ ``kvm_gmem_mmap``: a real ``GmemMapping`` (the same type as on kvm). The generic mmap(2)
        errnos first (EINVAL, ENOMEM, EOVERFLOW), then no GUEST_MEMFD_FLAG_MMAP → ENODEV, MAP_PRIVATE →
        EINVAL (``GmemFile.mmap``). The mapping may extend past EOF; see ``mapping.py`` for where accesses
        SIGBUS."""
        return map_gmem(self._file, self._fd, length, offset, shared)

    # --- file operations guest_memfd does not have (the core's ``GmemFile`` decides the errnos) ---------------

    def _read(self, n: int) -> bytes:
        self._file.read()

    def _write(self, data: bytes) -> int:
        self._file.write()

    def _pread(self, n: int, offset: int) -> bytes:
        self._file.pread(offset)

    def _pwrite(self, data: bytes, offset: int) -> int:
        self._file.pwrite(offset)

    def _truncate(self, length: int) -> None:
        self._file.setattr_size(length)

    def _stat(self) -> os.stat_result:
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
        self._sync_host_touched()
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
