"""guest_memfd operations of one VM (``virt/kvm/guest_memfd.c``): ``kvm_gmem_create``, the memslot binding
(``kvm_gmem_bind``/``kvm_gmem_unbind``) and the file operations — ``kvm_gmem_fallocate`` (allocate, punch
hole), ``kvm_gmem_error_folio`` (memory failure) and ``kvm_gmem_release`` — as kernel-step generators.

Why one module: every operation that takes memory away from a guest_memfd follows the same discipline under the
inode's ``invalidate_lock`` — ``kvm_gmem_invalidate_begin`` (begin and zap in every VM whose bindings meet the
range), then the change (truncate, poison, unlink), then ``kvm_gmem_invalidate_end`` — and the file and inode
objects themselves (``core/gmem.py``) stay plain state.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .gmem import HUGE_FOLIO_PAGES, Backing, GmemFile, GmemInode
from .memslots import Memslot
from .profile import SIM_GUEST_MEMFD_FLAG_HUGEPAGE
from .steps import (
    BUG_GMEM_START_UNCONDITIONAL,
    BUG_PUNCH_NO_TRUNCATE,
    BUG_UNBIND_SKIPS_DYING_FILE,
    RANK_INVALIDATE_LOCK,
    KLock,
    Step,
    Steps,
    run_steps,
)

if TYPE_CHECKING:
    from .vm import VmCore

MAX_LFS_FILESIZE = (1 << 63) - 1
_FALLOC_MODE_MASK = (
    uapi.FALLOC_FL_PUNCH_HOLE
    | uapi.FALLOC_FL_COLLAPSE_RANGE
    | uapi.FALLOC_FL_ZERO_RANGE
    | uapi.FALLOC_FL_INSERT_RANGE
    | uapi.FALLOC_FL_UNSHARE_RANGE
    | 0x80  # FALLOC_FL_WRITE_ZEROES (6.15+)
)
_HUGE_BYTES = HUGE_FOLIO_PAGES * uapi.PAGE_SIZE


class Fd(enum.Enum):
    """What a raw fd number resolves to, other than a guest_memfd file (``fget`` outcomes)."""

    NOT_OPEN = "not an open file descriptor"
    NOT_GMEM = "not a guest_memfd"


FdLookup = Callable[[int], "GmemFile | Fd"]


def signed32(value: int) -> int:
    """``value`` as the kernel's int (how an fd field prints in an error)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def vfs_fallocate(mode: int, offset: int, length: int) -> tuple[int, int]:
    """``vfs_fallocate``'s checks, before the file's own (the u64 arguments as loff_t): returns (offset, len)."""
    op = "fallocate"
    off, ln = uapi.signed64(offset), uapi.signed64(length)
    if off < 0 or ln <= 0:
        raise KvmError(errno.EINVAL, op, "offset < 0 or len <= 0")
    if mode & ~(_FALLOC_MODE_MASK | uapi.FALLOC_FL_KEEP_SIZE):
        raise KvmError(errno.EOPNOTSUPP, op, f"unknown mode bits in {mode:#x}")
    keep = bool(mode & uapi.FALLOC_FL_KEEP_SIZE)
    kind = mode & _FALLOC_MODE_MASK
    if kind in (0, uapi.FALLOC_FL_UNSHARE_RANGE, uapi.FALLOC_FL_ZERO_RANGE):
        pass
    elif kind == uapi.FALLOC_FL_PUNCH_HOLE:
        if not keep:
            raise KvmError(errno.EOPNOTSUPP, op, "PUNCH_HOLE needs KEEP_SIZE")
    elif kind in (uapi.FALLOC_FL_COLLAPSE_RANGE, uapi.FALLOC_FL_INSERT_RANGE, 0x80):
        if keep:
            raise KvmError(errno.EOPNOTSUPP, op, "mode incompatible with KEEP_SIZE")
    else:
        raise KvmError(errno.EOPNOTSUPP, op, f"mode combination {mode:#x}")
    if off + ln > MAX_LFS_FILESIZE:
        raise KvmError(errno.EFBIG, op, "offset + len beyond the maximum file size")
    return off, ln


def folio_range(inode: GmemInode, first: int, last: int) -> tuple[int, int]:
    """A huge-page file invalidates whole folios: no 2 MiB mapping may outlive part of its folio."""
    if inode.hugepage:
        first -= first % HUGE_FOLIO_PAGES
        last = -(-last // HUGE_FOLIO_PAGES) * HUGE_FOLIO_PAGES
    return first, last


class GmemOps:
    """``guest_memfd.c`` for the files one VM created; the files are ``VmCore.gmem_files``."""

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm

    # --- KVM_CREATE_GUEST_MEMFD and the memslot binding ------------------------------------------------------------

    def create(self, size: int, flags: int, backing: Callable[[int], Backing]) -> GmemFile:
        """``kvm_gmem_create``: flags, then size (positive, page aligned; 2 MiB aligned for a huge-page file)."""
        vm = self.vm
        op = "KVM_CREATE_GUEST_MEMFD"
        valid = vm.profile.gmem_valid_flags(vm.has_private_mem)
        if flags & ~valid:
            raise KvmError(errno.EINVAL, op, f"flags {flags:#x} not in supported {valid:#x}")
        if uapi.signed64(size) <= 0 or size % uapi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, op, f"size {size:#x} must be positive and page aligned")
        if flags & SIM_GUEST_MEMFD_FLAG_HUGEPAGE and size % _HUGE_BYTES:
            raise KvmError(errno.EINVAL, op, f"huge-page guest_memfd size {size:#x} not 2 MiB aligned")
        with vm.slots_lock:
            inode = GmemInode(size, flags, backing(size))
            # The sim serialises guest_memfd operations with the creating VM's slots_lock (an RLock).
            inode.invalidate_lock = KLock("invalidate_lock", f"ino{inode.ino}", RANK_INVALIDATE_LOCK, vm.slots_lock)
            file = GmemFile(inode, vm)
            vm.refs += 1
            vm.gmem_files.append(file)
            return file

    def bind_check(self, op: str, slot: Memslot, fd: int, offset: int, fd_lookup: FdLookup | None) -> GmemFile:
        """``kvm_gmem_bind``'s checks, without committing (the binding is installed with the slot)."""
        vm = self.vm
        profile = vm.profile
        fd &= 0xFFFFFFFF
        found: GmemFile | Fd = Fd.NOT_OPEN
        if fd < 1 << 31 and fd_lookup is not None:
            found = fd_lookup(fd)
        if found is Fd.NOT_OPEN:
            raise KvmError(errno.EBADF, op, f"guest_memfd {signed32(fd)} is not an open fd")
        if not isinstance(found, GmemFile):
            raise KvmError(errno.EINVAL, op, f"fd {fd} is not a guest_memfd")
        file = found
        if file.vm is not vm:
            raise KvmError(errno.EINVAL, op, "guest_memfd belongs to another VM")
        inode = file.inode
        size = slot.npages * uapi.PAGE_SIZE
        if profile.unsigned_bind_offsets:
            if offset + size > inode.size:
                raise KvmError(errno.EINVAL, op, "guest_memfd_offset + size beyond the file")
        else:  # ≤7.1: signed loff_t arithmetic (offset + size may wrap negative and pass)
            if uapi.signed64(offset) < 0 or uapi.signed64(offset + size) > inode.size:
                raise KvmError(errno.EINVAL, op, "guest_memfd_offset negative or offset + size beyond the file")
        if inode.hugepage and (offset % _HUGE_BYTES or size % _HUGE_BYTES):
            raise KvmError(errno.EINVAL, op, "huge-page guest_memfd needs 2 MiB aligned offset and size")
        first = offset >> uapi.PAGE_SHIFT
        for _s, _e, other in file.bound_pieces(first, first + slot.npages):
            raise KvmError(profile.bind_overlap_errno, op, f"file range already bound to {other!r}")
        return file

    def unbind(self, slot: Memslot) -> None:
        """kvm_gmem_unbind. A file whose last reference is gone but whose release has not run yet is dying:
        its bindings must still go, or release would later write into the freed slot."""
        file = slot.gmem
        dying = file is not None and file.refs == 0
        skip = dying and BUG_UNBIND_SKIPS_DYING_FILE in self.vm.bugs
        if file is not None and not file.released and not skip:
            for start, end, bound in list(file.bindings.pieces(slot.pgoff, slot.pgoff + slot.npages)):
                if bound is slot:
                    self.vm.mutating("unbind", slot.base_gfn + start - slot.pgoff, slot.base_gfn + end - slot.pgoff)
                    file.bindings.set(start, end, None)
        slot.gmem = None

    # --- fallocate (kvm_gmem_fallocate) --------------------------------------------------------------------------

    def fallocate(self, file: GmemFile, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd: ``vfs_fallocate``'s checks, then ``kvm_gmem_fallocate``'s, which
        dispatches to :meth:`punch` or :meth:`allocate`."""
        op = "fallocate"
        off, ln = vfs_fallocate(mode, offset, length)
        # kvm_gmem_fallocate
        if not mode & uapi.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, op, "guest_memfd requires KEEP_SIZE")
        if mode & ~(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, op, "guest_memfd supports only allocate and punch hole")
        if off % uapi.PAGE_SIZE or ln % uapi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, op, "offset or len not page aligned")
        if mode & uapi.FALLOC_FL_PUNCH_HOLE:
            self.punch(file, off >> uapi.PAGE_SHIFT, (off + ln) >> uapi.PAGE_SHIFT)
        else:
            self.allocate(file, off, ln)

    def allocate(self, file: GmemFile, offset: int, length: int) -> None:
        """``kvm_gmem_allocate``: a range reaching past EOF is EINVAL (the file never grows); then every missing
        page of ``[offset, offset + length)`` is allocated, zeroed."""
        op = "fallocate"
        inode = file.inode
        first, last = offset >> uapi.PAGE_SHIFT, (offset + length) >> uapi.PAGE_SHIFT
        if offset + length > inode.size:
            raise KvmError(errno.EINVAL, op, "allocation range beyond the end of the file")
        if inode.backing.address(first) is None:
            raise KvmError(errno.ENOMEM, op, "guest_memfd storage could not be mapped")
        run_steps(self.allocate_steps(file, first, last))

    def allocate_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """kvm_gmem_allocate: allocate (zeroed) folios under the inode's invalidate_lock; no invalidation,
        an absent page is mapped by nobody."""
        inv = file.inode.invalidate_lock
        yield Step("filemap_invalidate_lock; kvm_gmem_get_folio...", take=(inv,) if inv else (),
                   drop=(inv,) if inv else (), guard=self.vm.mmu.klock)  # fmt: skip
        file.inode.materialise(first, last)

    def punch(self, file: GmemFile, first: int, last: int) -> None:
        """PUNCH_HOLE pages ``[first, last)``: zap every bound gfn, then free (no bounds check)."""
        with self.vm.slots_lock:
            run_steps(self.punch_steps(file, first, last))

    def punch_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """kvm_gmem_punch_hole: under invalidate_lock, begin+zap in every VM bound to the range, truncate,
        then end in every VM."""
        inode = file.inode
        inv = inode.invalidate_lock
        assert inv is not None
        yield Step("kvm_gmem_punch_hole: filemap_invalidate_lock", take=(inv,))
        lo, hi = folio_range(inode, first, last)
        opened = yield from self._invalidate_begin(list(inode.files), lo, hi)
        if BUG_PUNCH_NO_TRUNCATE not in self.vm.bugs:
            yield Step("truncate_inode_pages_range", guard=self.vm.mmu.klock)
            for f in inode.files:
                for a, b in f.gfn_ranges(first, last):
                    f.vm.mutating("truncate", a, b)
            inode.free(first, last)
        yield from self._invalidate_end(lo, hi, opened)
        yield Step("filemap_invalidate_unlock", drop=(inv,))

    # --- the invalidation around a change (kvm_gmem_invalidate_begin/end) ----------------------------------------

    def _invalidate_begin(self, files: list[GmemFile], first: int, last: int) -> Steps[list[GmemFile]]:
        """kvm_gmem_invalidate_begin: per VM file (all of the inode's, or only the releasing one), the first
        binding overlapping the range takes that VM's mmu_lock and begins; every bound gfn range is added and
        zapped. Returns the files whose VM began."""
        opened = []
        for f in files:
            ranges = f.gfn_ranges(first, last)
            if not ranges and BUG_GMEM_START_UNCONDITIONAL not in self.vm.bugs:
                continue
            yield from f.vm.mmu.invalidate_steps(ranges, force=True, flush="kvm_flush_remote_tlbs")
            opened.append(f)
        return opened

    @staticmethod
    def _invalidate_end(first: int, last: int, opened: list[GmemFile]) -> Steps[None]:
        """kvm_gmem_invalidate_end: ends in every VM file whose bindings overlap the range."""
        for f in opened:
            if not f.gfn_ranges(first, last):
                continue  # with gmem_start_unconditional, a begin with no binding is never ended
            mmu = f.vm.mmu
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(mmu.klock,),
                       drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_end()

    # --- memory failure (kvm_gmem_error_folio) and release (kvm_gmem_release) -----------------------------------

    def poison(self, file: GmemFile, pgoff: int) -> None:
        """Memory failure on page ``pgoff`` (``kvm_gmem_error_folio``): zap bound gfns, mark hwpoison, do not
        truncate."""
        if not 0 <= pgoff < file.inode.npages:
            raise KvmError(errno.EINVAL, "inject_poison", f"page {pgoff:#x} beyond the end of the file")
        with self.vm.slots_lock:
            run_steps(self._poison_steps(file, pgoff))

    def _poison_steps(self, file: GmemFile, pgoff: int) -> Steps[None]:
        """kvm_gmem_error_folio: begin/zap, mark the folio, end (no truncation)."""
        inode = file.inode
        lo, hi = folio_range(inode, pgoff, pgoff + 1)
        opened = yield from self._invalidate_begin(list(inode.files), lo, hi)
        yield Step("folio hwpoison", guard=self.vm.mmu.klock)
        inode.poison(pgoff)
        yield from self._invalidate_end(lo, hi, opened)

    def release(self, file: GmemFile) -> None:
        """Last reference to a guest_memfd file dropped (``kvm_gmem_release``); drops the file's VM reference."""
        with self.vm.slots_lock:
            run_steps(self.release_steps(file))
            self.vm.put()

    def release_steps(self, file: GmemFile) -> Steps[None]:
        """kvm_gmem_release: slots_lock -> invalidate_lock; clear every bound slot's file pointer, begin+zap
        and end over the whole file, unlink the file; the inode's memory lives on while other files use it."""
        vm = self.vm
        inode = file.inode
        inv = inode.invalidate_lock
        assert inv is not None
        yield Step("kvm_gmem_release: mutex_lock(slots_lock)", take=(vm.slots_klock,))
        yield Step("filemap_invalidate_lock", take=(inv,))
        yield Step("WRITE_ONCE(slot->gmem.file, NULL) for every binding", guard=vm.mmu.klock)
        for _s, _e, slot in list(file.bound_pieces(0, 1 << 64)):
            if slot.freed:
                vm.kasan.append(f"kvm_gmem_release: write to freed memslot {slot.id} (slot->gmem.file)")
            if slot.gmem is file:
                slot.gmem = None
        opened = yield from self._invalidate_begin([file], 0, 1 << 64)  # only this VM's view
        yield from self._invalidate_end(0, 1 << 64, opened)
        yield Step("list_del(&f->entry); free the bindings", guard=vm.mmu.klock)
        file.bindings.set(0, 1 << 64, None)
        file.released = True
        inode.files.remove(file)
        last = not inode.files
        if last:
            yield Step("last file: evict the inode")
            for cb in list(vm.gmem_release_listeners):
                cb(inode)
            yield Step("truncate_inode_pages_final", guard=vm.mmu.klock)
            inode.destroy()
        if file in vm.gmem_files:
            vm.gmem_files.remove(file)
        yield Step("filemap_invalidate_unlock; mutex_unlock(slots_lock)", drop=(inv, vm.slots_klock))
