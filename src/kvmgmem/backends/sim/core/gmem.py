"""guest_memfd objects: the inode ("the physical memory") and the per-VM file ("one VM's view"), as in
virt/kvm/guest_memfd.c.

Why the split: upstream keeps physical state (size, flags, pages, poison) on the inode and bindings on the
file, and lifetimes differ — the file pins its VM, memslots do not pin the file, and an mmap pins the file
(an mmap holds a file reference; ``kvm_gmem_release``). Modelling both objects keeps those rules visible instead of
folding them into one class.

Page contents are not stored here: the model tracks page *state* (absent / present / hwpoisoned) and asks a
``Backing`` (owned by the adapter layer) for addresses and to discard bytes. The invariant the adapter keeps:
an absent page's bytes are zero, so materialising a page never needs to write memory.

Locking: callers hold the owning VM's ``mmu.lock`` around every mutation of ``pages`` and ``bindings``,
because vCPU threads read them in the fault path.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn, Protocol

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .profile import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, level_pages
from .rangemap import RangeMap

if TYPE_CHECKING:
    from .memslots import Memslot
    from .steps import KLock
    from .vm import VmCore

PAGE_ABSENT = 0
PAGE_PRESENT = 1
PAGE_HWPOISON = 2  # present, and marked poisoned by memory failure (``kvm_gmem_error_folio``)

PAGE_STATE_NAMES = {PAGE_ABSENT: "absent", PAGE_PRESENT: "present", PAGE_HWPOISON: "hwpoison"}

#: Pages per huge folio of a SIM_GUEST_MEMFD_FLAG_HUGEPAGE file (2 MiB).
HUGE_FOLIO_PAGES = level_pages(2)

_inode_numbers = itertools.count(1)


class Backing(Protocol):
    """Where an inode's bytes live (implemented by the adapter; a fake in unit tests)."""

    def address(self, pgoff: int) -> int | None:
        """Process address of page ``pgoff``'s first byte, or None if the storage could not be mapped."""

    def discard(self, first: int, last: int) -> None:
        """Free/zero pages ``[first, last)``: they must read as zero afterwards."""

    def release(self) -> None:
        """The inode died: unmap the storage."""

    def poison(self, pgoff: int) -> None:
        """Page ``pgoff`` is hwpoisoned: host mappings must SIGBUS on it (the kernel zaps them)."""

    def prepare(self, pgoff: int) -> None:
        """The fault path just allocated page ``pgoff`` (``kvm_gmem_get_folio``, then ``kvm_gmem_prepare_folio``
        zeroes it): its bytes are about to be used. A backing may make them resident now, and may make pages
        around it resident too, as long as every page the model calls absent still reads zero."""


class NullBacking:
    """A backing with no bytes (pure model tests): addresses are synthetic, nothing to discard."""

    def __init__(self, base: int = 0x7E0000000000) -> None:
        self.base = base
        self.released = False

    def address(self, pgoff: int) -> int | None:
        return self.base + pgoff * uapi.PAGE_SIZE

    def discard(self, first: int, last: int) -> None:
        pass

    def release(self) -> None:
        self.released = True

    def poison(self, pgoff: int) -> None:
        pass

    def prepare(self, pgoff: int) -> None:
        pass


class GmemInode:
    """The physical memory of one KVM_CREATE_GUEST_MEMFD: fixed size, flags, per-page state."""

    def __init__(self, size: int, flags: int, backing: Backing) -> None:
        self.ino = next(_inode_numbers)
        self.size = size
        self.npages = size >> uapi.PAGE_SHIFT
        self.flags = flags
        #: The sim-only huge-page flag (fixed at creation; read on every fault, so not a property).
        self.hugepage = bool(flags & SIM_GUEST_MEMFD_FLAG_HUGEPAGE)
        self.backing = backing
        self.pages: RangeMap[int] = RangeMap(PAGE_ABSENT)
        self.files: list[GmemFile] = []
        #: The inode's filemap invalidate_lock, set by the VM that creates the inode (``VmCore``).
        self.invalidate_lock: KLock | None = None
        self.alive = True
        self.pages_allocated = 0
        self.pages_freed = 0

    # --- flags ---------------------------------------------------------------------------------------

    @property
    def mmap_allowed(self) -> bool:
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_MMAP)

    @property
    def init_shared(self) -> bool:
        return bool(self.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED)

    # --- page state ----------------------------------------------------------------------------------

    def state(self, pgoff: int) -> int:
        return self.pages.get(pgoff)

    @property
    def nr_present(self) -> int:
        """Pages currently allocated (present or poisoned)."""
        return self.npages - self.pages.count(0, self.npages, PAGE_ABSENT)

    def materialise(self, first: int, last: int) -> int:
        """Allocate every absent page in ``[first, last)`` (zero-filled: the backing keeps absent pages
        zero). A huge-page file allocates whole 2 MiB folios. Existing pages and poison marks are kept.
        Returns the number of pages newly allocated."""
        if last == first + 1 and not self.hugepage and self.pages.get(first) != PAGE_ABSENT:
            return 0  # the fault path's common case: one page, already there
        if self.hugepage:
            first -= first % HUGE_FOLIO_PAGES
            last = -(-last // HUGE_FOLIO_PAGES) * HUGE_FOLIO_PAGES
        last = min(last, self.npages)
        added = 0
        for start, end, state in list(self.pages.pieces(first, last)):
            if state == PAGE_ABSENT:
                self.pages.set(start, end, PAGE_PRESENT)
                added += end - start
        self.pages_allocated += added
        return added

    def get_folio(self, pgoff: int, state: int | None = None) -> int:
        """``kvm_gmem_get_folio`` for one page: allocate it if absent (a huge-page file allocates its whole
        folio, absent pages around a present one included; the backing prepares the page) and return its
        state, PRESENT or HWPOISON. Order-0 files, the fault path's common case, take one range-map lookup;
        ``state``, the page's state when the caller just read it (under the same lock), saves that one."""
        if self.hugepage:
            if self.materialise(pgoff, pgoff + 1):
                self.backing.prepare(pgoff)
            return self.pages.get(pgoff)
        if state is None:
            state = self.pages.get(pgoff)
        if state == PAGE_ABSENT:  # what materialise does for one order-0 page
            self.pages.set(pgoff, pgoff + 1, PAGE_PRESENT)
            self.pages_allocated += 1
            self.backing.prepare(pgoff)
            return PAGE_PRESENT
        return state

    def free(self, first: int, last: int) -> int:
        """Truncate ``[first, last)``: pages (and their poison marks) go, bytes read zero again.
        Returns the number of pages freed."""
        last = min(last, self.npages)
        if last <= first:
            return 0
        freed = (last - first) - self.pages.count(first, last, PAGE_ABSENT)
        self.pages.set(first, last, PAGE_ABSENT)
        self.backing.discard(first, last)
        self.pages_freed += freed
        return freed

    def poison(self, pgoff: int) -> None:
        """Mark page ``pgoff`` hwpoisoned (memory failure hits a physical page, so it is present)."""
        self.materialise(pgoff, pgoff + 1)
        self.pages.set(pgoff, pgoff + 1, PAGE_HWPOISON)
        self.backing.poison(pgoff)

    def destroy(self) -> None:
        """Last reference gone: free every page and release the storage."""
        if not self.alive:
            return
        self.pages_freed += self.nr_present
        self.pages = RangeMap(PAGE_ABSENT)
        self.alive = False
        self.backing.release()


class GmemFile:
    """One VM's view of a guest_memfd inode: the bindings (page index → memslot) and the VM reference.

    ``refs`` counts the fd plus every host mmap (an mmap holds a file reference, ``kvm_gmem_mmap``). When it reaches
    zero the VM releases the file (``kvm_gmem_release``): bound slots lose their file pointer, their SPTEs are zapped.
    """

    def __init__(self, inode: GmemInode, vm: VmCore) -> None:
        self.inode = inode
        self.vm = vm
        self.bindings: RangeMap[Memslot | None] = RangeMap(None)
        self.refs = 1
        self.released = False
        inode.files.append(self)

    def get(self) -> None:
        """Take a reference (an mmap, or the sim CPU pinning the storage)."""
        with self.vm.slots_lock:
            if self.released:
                raise RuntimeError("guest_memfd file already released")
            self.refs += 1

    def put(self) -> None:
        """Drop a reference; the last one releases the file (and maybe the inode and the VM)."""
        with self.vm.slots_lock:
            if self.released or self.refs <= 0:
                return
            self.refs -= 1
            if self.refs == 0:
                self.vm.release_gmem_file(self)

    def bound_pieces(self, first: int, last: int) -> Iterator[tuple[int, int, Memslot]]:
        """Bindings overlapping page range ``[first, last)``: ``(first, last, slot)`` pieces."""
        for start, end, slot in self.bindings.pieces(first, last):
            if slot is not None:
                yield start, end, slot

    def gfn_ranges(self, first: int, last: int) -> list[tuple[int, int]]:
        """gfn ranges bound to pages ``[first, last)`` (gfn = base_gfn + (index − pgoff), as
        ``kvm_gmem_invalidate_begin`` computes it)."""
        out = []
        for start, end, slot in self.bound_pieces(first, last):
            out.append((slot.base_gfn + start - slot.pgoff, slot.base_gfn + end - slot.pgoff))
        return out

    # --- kvm_gmem_fops and the VFS around it: what a guest_memfd file does and does not do -----------------------
    # The adapter owns the fd and the host mapping; every errno a file operation gives is decided here. Errnos
    # are those measured on 6.18.

    def read(self) -> NoReturn:
        """read(2): ``kvm_gmem_fops`` has no read operation, so ``vfs_read`` refuses with EINVAL."""
        raise KvmError(errno.EINVAL, "read", "guest_memfd has no read operation")

    def write(self) -> NoReturn:
        """write(2): no write operation either (``vfs_write``: EINVAL)."""
        raise KvmError(errno.EINVAL, "write", "guest_memfd has no write operation")

    def pread(self, offset: int) -> NoReturn:
        """pread64(2) at ``offset`` (the u64 a caller passes): ``ksys_pread64`` refuses a negative offset with
        EINVAL before it finds the file is not positionable (no FMODE_PREAD: ESPIPE)."""
        _positioned("pread", offset)

    def pwrite(self, offset: int) -> NoReturn:
        """pwrite64(2): the same checks as :meth:`pread` (``ksys_pwrite64``)."""
        _positioned("pwrite", offset)

    def setattr_size(self, length: int) -> NoReturn:
        """ftruncate(2) to any ``length``: ``kvm_gmem_setattr`` refuses every size change (EINVAL); the size
        is fixed at creation."""
        raise KvmError(errno.EINVAL, "ftruncate", "guest_memfd is not resizable")

    def mmap(self, shared: bool) -> None:
        """mmap(2), after the generic ``do_mmap`` checks (which the adapter gets from the host): ``kvm_gmem_mmap``
        refuses a file without GUEST_MEMFD_FLAG_MMAP (and every file of a kernel without guest_memfd mmap)
        with ENODEV, then a private (copy-on-write) mapping with EINVAL."""
        if not (self.vm.profile.gmem_flags and self.inode.mmap_allowed):
            raise KvmError(errno.ENODEV, "mmap", "guest_memfd was not created with GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise KvmError(errno.EINVAL, "mmap", "guest_memfd can only be mapped MAP_SHARED")

    def madvise_collapse(self) -> NoReturn:
        """MADV_COLLAPSE on a mapping of the file: guest_memfd folios are never collapsed into huge pages
        (``madvise_collapse`` finds the mapping not eligible: EINVAL)."""
        raise KvmError(errno.EINVAL, "madvise", "guest_memfd never collapses into huge folios")


def _positioned(op: str, offset: int) -> NoReturn:
    if uapi.signed64(offset) < 0:
        raise KvmError(errno.EINVAL, op, "negative offset")
    raise KvmError(errno.ESPIPE, op, "guest_memfd is not seekable")
