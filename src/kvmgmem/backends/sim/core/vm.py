"""The VM: every ioctl-level operation of the model, raising the kernel's errno in the kernel's order.

Why one class sequences everything: the interesting rules are orderings — argument checks before table
lookups, GPA overlap (EEXIST) before the guest_memfd bind, bind errors before the arch range check, zap
before change (``__kvm_set_memory_region``, ``kvm_vm_ioctl_set_mem_attributes``,
``kvm_gmem_fallocate``, ``kvm_gmem_release``, ``kvm_mmu_invalidate_begin``/``_end``). Keeping each operation in one
method, written as the
spec's numbered steps, makes the order reviewable.

Locks: ``slots_lock`` (an RLock, KVM's slots_lock) serialises the ioctl-level operations of one VM and its
guest_memfds; ``mmu.lock`` (KVM's mmu_lock) guards what the fault path reads and is only held for short
sections, never while zap listeners run. vCPU threads take only ``mmu.lock``.
"""

from __future__ import annotations

import enum
import errno
import itertools
import threading
from collections.abc import Callable
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from . import attributes as attrs
from .attributes import AttributeMap
from .caps import check_extension, supported_attributes
from .gmem import HUGE_FOLIO_PAGES, PAGE_STATE_NAMES, Backing, GmemFile, GmemInode
from .memslots import HUGE_LEVELS, OP_V1, OP_V2, AddressSpace, Memslot, MemslotChange, check_region
from .mmu import FaultResult, Mmu, ZapListener
from .profile import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, Profile, level_pages
from .quirks import disable_quirks, flush_zaps_all
from .steps import (
    BUG_ATTR_NO_RANGE_ADD,
    BUG_GMEM_START_UNCONDITIONAL,
    BUG_NO_HUGEPAGE_HEAD_TAIL,
    BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP,
    BUG_PUNCH_NO_TRUNCATE,
    BUG_SKIP_SHARED_ONLY_SLOTS,
    BUG_UNBIND_SKIPS_DYING_FILE,
    RANK_INVALIDATE_LOCK,
    RANK_SLOTS_LOCK,
    KLock,
    Step,
    Steps,
    run_steps,
)
from .x86_vm import X86Vm

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
_vm_numbers = itertools.count(1)

#: ``VmCore.mutation_hook(kind, gfn_start, gfn_end)``: called when a writer changes what a gfn translates to
#: ("attributes", "truncate", "unbind", "memslot", "hva"); the interleaving checker asserts nothing maps it then.
MutationHook = Callable[[str, int, int], None]


class Fd(enum.Enum):
    """What a raw fd number resolves to, other than a guest_memfd file (``fget`` outcomes)."""

    NOT_OPEN = "not an open file descriptor"
    NOT_GMEM = "not a guest_memfd"


FdLookup = Callable[[int], "GmemFile | Fd"]


def _vfs_fallocate(mode: int, offset: int, length: int) -> tuple[int, int]:
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


def create_vm(profile: Profile, vm_type: int) -> VmCore:
    """KVM_CREATE_VM (``kvm_dev_ioctl_create_vm``, x86 ``kvm_arch_init_vm``): the type must be < 32 and in the
    supported bitmap."""
    if vm_type >= 32 or not profile.vm_types_mask & (1 << vm_type):
        raise KvmError(errno.EINVAL, "KVM_CREATE_VM", f"VM type {vm_type} not supported")
    return VmCore(profile, vm_type)


class VmCore:
    """The kernel-side state of one VM (struct kvm) and its operations."""

    def __init__(self, profile: Profile, vm_type: int) -> None:
        self.profile = profile
        self.vm_type = vm_type
        self.has_private_mem = vm_type in uapi.PRIVATE_MEM_VM_TYPES
        self.nr_address_spaces = 1 if self.has_private_mem else profile.address_spaces
        self.name = f"vm{next(_vm_numbers)}"
        self.slots_lock = threading.RLock()
        self.slots_klock = KLock("slots_lock", self.name, RANK_SLOTS_LOCK, self.slots_lock)
        #: Historic kernel bugs put back into the model (``steps.BUGS``); only the checker sets them.
        self.bugs: frozenset[str] = frozenset()
        #: vCPUs inside a fault's SRCU read section (what synchronize_srcu waits for).
        self.srcu_readers = 0
        #: mm-notifier invalidations between range_start and range_end (kvm->mn_active_invalidate_count).
        self.mn_active_invalidate_count = 0
        #: Accesses to freed memslots, as KASAN would report them.
        self.kasan: list[str] = []
        self.mutation_hook: MutationHook | None = None
        self.mmu = Mmu(self)
        self.memslots = [AddressSpace(i) for i in range(self.nr_address_spaces)]
        self.attributes = AttributeMap()
        self.hypercall_exit_mask = 0
        #: kvm->arch.disabled_quirks. The kernel starts it at the vendor's inapplicable quirks (CD_NW_CLEARED on VMX,
        #: IGNORE_GUEST_PAT on SVM), none of which the sim models; the sim has no vendor and starts at 0.
        self.disabled_quirks = 0
        self.refs = 1  # the VM fd; vCPU fds and every guest_memfd file add one
        self.gmem_files: list[GmemFile] = []
        #: Ids of every vCPU the VM ever created (kvm->created_vcpus and the vCPU array): closing a vCPU fd frees
        #: neither, the vCPU lives until the VM is destroyed.
        self.vcpu_ids: set[int] = set()
        self.arch = X86Vm()  # kvm->arch: irqchip mode, shadow-MMU page budget (core/x86_vm.py)
        self.destroyed = False
        self.destroy_listeners: list[Callable[[], None]] = []
        self.gmem_release_listeners: list[Callable[[GmemInode], None]] = []

    # --- lifetime --------------------------------------------------------------------------------------

    def get(self) -> None:
        with self.slots_lock:
            self.refs += 1

    def put(self) -> None:
        """Drop a reference (VM fd, vCPU fd, or a released guest_memfd file); the last destroys the VM."""
        with self.slots_lock:
            self.refs -= 1
            if self.refs == 0:
                self._destroy()

    def _destroy(self) -> None:
        self.destroyed = True
        run_steps(self._destroy_steps())
        for cb in list(self.destroy_listeners):
            cb()

    def _destroy_steps(self) -> Steps[None]:
        ranges = [(s.base_gfn, s.end_gfn) for s in self.memslots[0]]
        yield from self.mmu.invalidate_steps(ranges)
        yield Step("kvm_destroy_vm: free memslots", guard=self.mmu.klock)
        for space in self.memslots:
            for slot in space:
                space.remove(slot)
                slot.gmem = None  # no file can still be bound: files pin the VM
        yield from self.mmu.end_steps(ranges)

    def _mutating(self, kind: str, lo: int, hi: int) -> None:
        if self.mutation_hook is not None and hi > lo:
            self.mutation_hook(kind, lo, hi)

    def add_zap_listener(self, callback: ZapListener) -> None:
        """See the contract in ``core/mmu.py``."""
        self.mmu.zap_listeners.append(callback)

    def remove_zap_listener(self, callback: ZapListener) -> None:
        if callback in self.mmu.zap_listeners:
            self.mmu.zap_listeners.remove(callback)

    def add_gmem_release_listener(self, callback: Callable[[GmemInode], None]) -> None:
        self.gmem_release_listeners.append(callback)

    # --- KVM_CHECK_EXTENSION / KVM_ENABLE_CAP -------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        return check_extension(self.profile, cap, self)

    def enable_cap(self, cap: int, flags: int, args: tuple[int, ...]) -> None:
        """KVM_ENABLE_CAP on the VM (x86 ``kvm_vm_ioctl_enable_cap``): KVM_CAP_EXIT_HYPERCALL and
        KVM_CAP_DISABLE_QUIRKS/DISABLE_QUIRKS2 (``core/quirks.py``) are modelled, any other cap is EINVAL."""
        op = "KVM_ENABLE_CAP"
        if cap not in (uapi.KVM_CAP_EXIT_HYPERCALL, uapi.KVM_CAP_DISABLE_QUIRKS, uapi.KVM_CAP_DISABLE_QUIRKS2):
            raise KvmError(errno.EINVAL, op, f"capability {cap} cannot be enabled on this VM")
        allowed = 1 << uapi.KVM_HC_MAP_GPA_RANGE
        if flags != 0:
            raise KvmError(errno.EINVAL, op, f"flags {flags:#x} must be 0")
        if cap != uapi.KVM_CAP_EXIT_HYPERCALL:
            with self.slots_lock:  # the kernel takes kvm->lock
                self.disabled_quirks = disable_quirks(self.profile, self.disabled_quirks, cap, args[0])
            return
        if args[0] & ~allowed:
            raise KvmError(errno.EINVAL, op, f"args[0] {args[0]:#x} has bits outside {allowed:#x}")
        with self.slots_lock:
            self.hypercall_exit_mask = args[0]

    # --- KVM_CREATE_VCPU (kvm_vm_ioctl_create_vcpu) -----------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> None:
        """Admit vCPU ``vcpu_id``: an id at or above KVM_CAP_MAX_VCPU_ID → EINVAL; KVM_CAP_MAX_VCPUS vCPUs
        already created → EINVAL; an id already used (even by a vCPU whose fd was closed) → EEXIST. The caller
        builds the vCPU and calls :meth:`create_vcpu_failed` if that fails, as the kernel unwinds
        ``created_vcpus``."""
        op = "KVM_CREATE_VCPU"
        profile = self.profile
        with self.slots_lock:
            if vcpu_id >= profile.max_vcpu_id:
                raise KvmError(errno.EINVAL, op, f"vcpu_id {vcpu_id} >= KVM_CAP_MAX_VCPU_ID {profile.max_vcpu_id}")
            if len(self.vcpu_ids) >= profile.max_vcpus:
                raise KvmError(errno.EINVAL, op, f"already {len(self.vcpu_ids)} vCPUs (KVM_CAP_MAX_VCPUS)")
            if vcpu_id in self.vcpu_ids:
                raise KvmError(errno.EEXIST, op, f"vCPU {vcpu_id} already exists (closing its fd does not free the id)")
            self.vcpu_ids.add(vcpu_id)

    def create_vcpu_failed(self, vcpu_id: int) -> None:
        """The vCPU admitted by :meth:`create_vcpu` could not be built: its id and its count are free again."""
        with self.slots_lock:
            self.vcpu_ids.discard(vcpu_id)

    # --- KVM_CREATE_GUEST_MEMFD (kvm_gmem_create) ---------------------------------------------------------------------

    def create_guest_memfd(self, size: int, flags: int, backing: Callable[[int], Backing]) -> GmemFile:
        op = "KVM_CREATE_GUEST_MEMFD"
        valid = self.profile.gmem_valid_flags(self.has_private_mem)
        if flags & ~valid:
            raise KvmError(errno.EINVAL, op, f"flags {flags:#x} not in supported {valid:#x}")
        if uapi.signed64(size) <= 0 or size % uapi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, op, f"size {size:#x} must be positive and page aligned")
        if flags & SIM_GUEST_MEMFD_FLAG_HUGEPAGE and size % _HUGE_BYTES:
            raise KvmError(errno.EINVAL, op, f"huge-page guest_memfd size {size:#x} not 2 MiB aligned")
        with self.slots_lock:
            inode = GmemInode(size, flags, backing(size))
            # The sim serialises guest_memfd operations with the creating VM's slots_lock (an RLock).
            inode.invalidate_lock = KLock("invalidate_lock", f"ino{inode.ino}", RANK_INVALIDATE_LOCK, self.slots_lock)
            file = GmemFile(inode, self)
            self.refs += 1
            self.gmem_files.append(file)
            return file

    # --- KVM_SET_USER_MEMORY_REGION(2) (__kvm_set_memory_region) ------------------------------------------------------

    def set_user_memory_region(
        self,
        *,
        v2: bool,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
        hva_live: tuple[int, int] | None = None,
        fd_lookup: FdLookup | None = None,
    ) -> None:
        """All integer arguments are the raw u32/u64 field values (``guest_memfd`` the u32 fd field)."""
        op = OP_V2 if v2 else OP_V1
        if not v2:
            guest_memfd_offset = 0
        check_region(
            self.profile, self.has_private_mem, self.nr_address_spaces, v2, slot, flags,
            guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
        )  # fmt: skip
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        space = self.memslots[as_id]
        base_gfn, npages = guest_phys_addr >> uapi.PAGE_SHIFT, memory_size >> uapi.PAGE_SHIFT
        with self.slots_lock:
            old = space.get(slot_id)
            change = self._memslot_change(op, f"{as_id}:{slot_id}", old, base_gfn, npages, flags, userspace_addr)
            if change is None:
                assert old is not None
                old.hva_live = hva_live  # no-op for KVM; the adapter re-pinned the same memory
                return
            if change is MemslotChange.DELETE:
                self._set_memslot(space, old, None, change)
                return
            # K. GPA overlap (CREATE or MOVE)
            new_range = change in (MemslotChange.CREATE, MemslotChange.MOVE)
            if new_range:
                clash = space.overlapping(base_gfn, base_gfn + npages, exclude=old)
                if clash:
                    raise KvmError(errno.EEXIST, op, f"gpa range overlaps {clash[0]!r}")
            # L. allocate
            new = Memslot(slot_id, as_id, base_gfn, npages, flags, userspace_addr, hva_live)
            # M. kvm_gmem_bind checks (the binding itself is committed with the slot)
            file = None
            if flags & uapi.KVM_MEM_GUEST_MEMFD:
                file = self._bind_check(op, new, guest_memfd, guest_memfd_offset, fd_lookup)
            # N. arch commit: the slot must end below the maximum guest physical address
            if new_range and base_gfn + npages - 1 > self.profile.max_gfn:
                raise KvmError(errno.EINVAL, op, f"slot ends above the {self.profile.max_gpa_bits}-bit GPA limit")
            self._init_mixed(new)
            if file is not None:
                new.gmem, new.pgoff = file, guest_memfd_offset >> uapi.PAGE_SHIFT
                new.gmem_only = self.profile.gmem_only_slots and file.inode.mmap_allowed
            self._set_memslot(space, old, new, change)

    def _memslot_change(
        self, op: str, name: str, old: Memslot | None, base_gfn: int, npages: int, flags: int, userspace_addr: int
    ) -> MemslotChange | None:
        """``__kvm_set_memory_region``'s decision of what kind of change this is (None: nothing changes), with
        the checks that belong to it: deleting a slot that does not exist, and modifying what may not change."""
        # I. delete
        if npages == 0:
            if old is None:
                raise KvmError(errno.EINVAL, op, f"slot {name} does not exist")
            return MemslotChange.DELETE
        if old is None:
            return MemslotChange.CREATE
        # J. modify
        if flags & uapi.KVM_MEM_GUEST_MEMFD:
            raise KvmError(errno.EINVAL, op, "guest_memfd memslots are immutable (delete instead)")
        toggle = uapi.KVM_MEM_READONLY
        if self.profile.reject_gmem_flag_toggle:
            toggle |= uapi.KVM_MEM_GUEST_MEMFD
        if userspace_addr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & toggle:
            raise KvmError(errno.EINVAL, op, "userspace_addr, size or READONLY/GUEST_MEMFD changed")
        if base_gfn != old.base_gfn:
            return MemslotChange.MOVE
        if flags != old.flags:
            return MemslotChange.FLAGS_ONLY
        return None

    def _bind_check(self, op: str, slot: Memslot, fd: int, offset: int, fd_lookup: FdLookup | None) -> GmemFile:
        """``kvm_gmem_bind``'s checks, without committing."""
        fd &= 0xFFFFFFFF
        found: GmemFile | Fd = Fd.NOT_OPEN
        if fd < 1 << 31 and fd_lookup is not None:
            found = fd_lookup(fd)
        if found is Fd.NOT_OPEN:
            raise KvmError(errno.EBADF, op, f"guest_memfd {signed32(fd)} is not an open fd")
        if not isinstance(found, GmemFile):
            raise KvmError(errno.EINVAL, op, f"fd {fd} is not a guest_memfd")
        file = found
        if file.vm is not self:
            raise KvmError(errno.EINVAL, op, "guest_memfd belongs to another VM")
        inode = file.inode
        size = slot.npages * uapi.PAGE_SIZE
        if self.profile.unsigned_bind_offsets:
            if offset + size > inode.size:
                raise KvmError(errno.EINVAL, op, "guest_memfd_offset + size beyond the file")
        else:  # ≤7.1: signed loff_t arithmetic (offset + size may wrap negative and pass)
            if uapi.signed64(offset) < 0 or uapi.signed64(offset + size) > inode.size:
                raise KvmError(errno.EINVAL, op, "guest_memfd_offset negative or offset + size beyond the file")
        if inode.hugepage and (offset % _HUGE_BYTES or size % _HUGE_BYTES):
            raise KvmError(errno.EINVAL, op, "huge-page guest_memfd needs 2 MiB aligned offset and size")
        first = offset >> uapi.PAGE_SHIFT
        for _s, _e, other in file.bound_pieces(first, first + slot.npages):
            raise KvmError(self.profile.bind_overlap_errno, op, f"file range already bound to {other!r}")
        return file

    def _set_memslot(
        self, space: AddressSpace, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> None:
        """Commit a memslot change (caller holds ``slots_lock``)."""
        run_steps(self.set_memslot_steps(space, old, new, change))

    def set_memslot_steps(
        self, space: AddressSpace, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> Steps[None]:
        """``kvm_set_memslot``: one sequence per kind of change. Delete and move do not use the invalidation
        sequence: the old slot is published INVALID (faults on it retry), SRCU readers drain, the slot is
        zapped, the new memslots are published, SRCU drains again, and only then is the old slot freed
        (``kvm_gmem_unbind``). Caller holds slots_lock."""
        if change is MemslotChange.CREATE:
            assert old is None and new is not None
            yield from self._create_memslot(space, new)
        elif change is MemslotChange.DELETE:
            assert old is not None and new is None
            yield from self._delete_memslot(space, old)
        elif change is MemslotChange.MOVE:
            assert old is not None and new is not None
            yield from self._move_memslot(space, old, new)
        else:
            assert old is not None and new is not None
            yield from self._update_flags_memslot(space, old, new)

    def _create_memslot(self, space: AddressSpace, new: Memslot) -> Steps[None]:
        """``kvm_create_memslot``: nothing maps the range yet, so only the publish."""
        yield from self._swap_memslots()
        self._install_memslot(space, new)

    def _delete_memslot(self, space: AddressSpace, old: Memslot) -> Steps[None]:
        """``kvm_delete_memslot``, after ``kvm_invalidate_memslot``."""
        yield from self._invalidate_memslot(space, old)
        yield from self._swap_memslots()
        self._remove_memslot(space, old)
        yield from self._free_memslot(old)

    def _move_memslot(self, space: AddressSpace, old: Memslot, new: Memslot, flags_only: bool = False) -> Steps[None]:
        """``kvm_move_memslot``, after ``kvm_invalidate_memslot``: the new slot replaces the old one."""
        yield from self._invalidate_memslot(space, old, flags_only)
        yield from self._swap_memslots()
        self._remove_memslot(space, old)
        self._install_memslot(space, new)
        yield from self._free_memslot(old)

    def _update_flags_memslot(self, space: AddressSpace, old: Memslot, new: Memslot) -> Steps[None]:
        """``kvm_update_flags_memslot`` with the arch commit's zap. The kernel swaps the slot in place and
        ``kvm_mmu_slot_apply_flags`` zaps or write-protects what dirty logging needs; the sim zaps the whole
        slot through the same INVALID-slot sequence as a move, which is never less safe; only the slot, as
        ``kvm_mmu_slot_apply_flags`` touches no other (no ``kvm_arch_flush_shadow_memslot``, no zap-all quirk)."""
        yield from self._move_memslot(space, old, new, flags_only=True)

    def _invalidate_memslot(self, space: AddressSpace, old: Memslot, flags_only: bool = False) -> Steps[None]:
        """``kvm_invalidate_memslot``: publish the INVALID slot, drain SRCU, then ``kvm_arch_flush_shadow_memslot``:
        zap every SPTE of the VM (KVM_X86_QUIRK_SLOT_ZAP_ALL, ``flush_zaps_all``) or only the slot's (the sim's
        SPTEs are all address space 0's, so an SMM slot has none)."""
        yield Step("kvm_invalidate_memslot: publish the INVALID slot", guard=self.mmu.klock)
        old.invalid = True  # concurrent faults on it retry
        yield Step("kvm_swap_active_memslots: synchronize_srcu_expedited", wait=self._srcu_idle)
        zap_all = not flags_only and flush_zaps_all(self.profile, self.vm_type, self.disabled_quirks)
        if zap_all or space.as_id == 0:
            how = "kvm_mmu_zap_all_fast" if zap_all else "kvm_mmu_zap_memslot"
            yield Step(f"kvm_arch_flush_shadow_memslot: write_lock(mmu_lock); {how}",
                       take=(self.mmu.klock,), drop=(self.mmu.klock,))  # fmt: skip
            lo, hi = (0, self.profile.max_gfn + 1) if zap_all else (old.base_gfn, old.end_gfn)
            self.mmu.zap(lo, hi)
            yield Step("kvm_flush_remote_tlbs")
            self.mmu.notify_zap(lo, hi)

    def _swap_memslots(self) -> Steps[None]:
        """``kvm_swap_active_memslots``: wait until no mm-notifier invalidation is between start and end."""
        if BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP in self.bugs:
            yield Step("kvm_swap_active_memslots: publish the new memslots (no wait)", guard=self.mmu.klock)
        else:
            yield Step("kvm_swap_active_memslots: wait for mn_active_invalidate_count == 0; publish the new memslots",
                       guard=self.mmu.klock, wait=self._mn_idle)  # fmt: skip

    def _remove_memslot(self, space: AddressSpace, old: Memslot) -> None:
        self._mutating("memslot", old.base_gfn, old.end_gfn)
        space.remove(old)

    @staticmethod
    def _install_memslot(space: AddressSpace, new: Memslot) -> None:
        if new.gmem is not None:
            new.gmem.bindings.set(new.pgoff, new.pgoff + new.npages, new)
        space.install(new)

    def _free_memslot(self, old: Memslot) -> Steps[None]:
        """``kvm_free_memslot`` after the second SRCU drain: unbind the guest_memfd (``kvm_gmem_unbind``)."""
        inv = old.gmem.inode.invalidate_lock if old.gmem is not None else None
        yield Step("synchronize_srcu; kvm_free_memslot: kvm_gmem_unbind", wait=self._srcu_idle,
                   take=(inv,) if inv else (), drop=(inv,) if inv else (), guard=self.mmu.klock)  # fmt: skip
        self._unbind(old)
        old.freed = True

    def _srcu_idle(self) -> bool:
        return self.srcu_readers == 0

    def _mn_idle(self) -> bool:
        return self.mn_active_invalidate_count == 0

    # --- mm notifier (hva side) ------------------------------------------------------------------------------

    def _hva_gfn_ranges(self, hva_start: int, hva_end: int) -> list[tuple[int, int]]:
        """gfn ranges of the address-space-0 memslots whose userspace range meets ``[hva_start, hva_end)``."""
        out = []
        for s in self.memslots[0]:
            lo = max(hva_start, s.userspace_addr)
            hi = min(hva_end, s.userspace_addr + s.npages * uapi.PAGE_SIZE)
            if lo < hi:
                first = s.base_gfn + (lo - s.userspace_addr) // uapi.PAGE_SIZE
                last = s.base_gfn + -(-(hi - s.userspace_addr) // uapi.PAGE_SIZE)
                out.append((first, last))
        return out

    def mmu_notifier_invalidate_steps(self, hva_start: int, hva_end: int) -> Steps[None]:
        """kvm_mmu_notifier_invalidate_range_start / _end around a host change of ``[hva_start, hva_end)``
        (munmap, migration, THP split). Both callbacks take mmu_lock and begin/end only if a memslot overlaps
        *at that moment*, which is why memslot publication waits for ``mn_active_invalidate_count`` to drop
        to zero. Only the shared (hva-backed) side is affected (KVM_FILTER_SHARED)."""
        mmu = self.mmu
        yield Step("kvm_mmu_notifier_invalidate_range_start: mn_active_invalidate_count++")
        self.mn_active_invalidate_count += 1
        ranges = self._hva_gfn_ranges(hva_start, hva_end)
        if ranges:
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_begin; kvm_unmap_gfn_range (KVM_FILTER_SHARED)",
                       take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_begin()
            for lo, hi in ranges:
                mmu.invalidate_range_add(lo, hi)
                for spte in [s for s in mmu.overlapping(lo, hi) if s.gmem is None]:
                    mmu.zap(spte.gfn, spte.end_gfn)
            yield Step("kvm_flush_remote_tlbs")
            mmu.notify_zaps(ranges)
        yield Step("the host changes the pages behind the hva range")
        for lo, hi in self._hva_gfn_ranges(hva_start, hva_end):
            self._mutating("hva", lo, hi)
        yield Step("kvm_mmu_notifier_invalidate_range_end")
        if self._hva_gfn_ranges(hva_start, hva_end):
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(mmu.klock,), drop=(mmu.klock,))
            mmu.invalidate_end()
        yield Step("mn_active_invalidate_count--; rcuwait_wake_up(&kvm->mn_memslots_update_rcuwait)")
        self.mn_active_invalidate_count -= 1

    def _unbind(self, slot: Memslot) -> None:
        """kvm_gmem_unbind. A file whose last reference is gone but whose release has not run yet is dying:
        its bindings must still go, or release would later write into the freed slot."""
        file = slot.gmem
        dying = file is not None and file.refs == 0
        skip = dying and BUG_UNBIND_SKIPS_DYING_FILE in self.bugs
        if file is not None and not file.released and not skip:
            for start, end, bound in list(file.bindings.pieces(slot.pgoff, slot.pgoff + slot.npages)):
                if bound is slot:
                    self._mutating("unbind", slot.base_gfn + start - slot.pgoff, slot.base_gfn + end - slot.pgoff)
                    file.bindings.set(start, end, None)
        slot.gmem = None

    # --- huge-page "mixed" tracking (hugepage_has_attrs) --------------------------------------------------------------

    def _init_mixed(self, slot: Memslot) -> None:
        for level in HUGE_LEVELS:
            n = level_pages(level)
            for b in self.attributes.boundaries(slot.base_gfn, slot.end_gfn):
                if b % n and slot.contains_region(b - b % n, level):
                    slot.mixed[level].set(b // n, b // n + 1, True)

    def _update_mixed(self, slot: Memslot, start: int, end: int) -> None:
        """After storing attributes on ``[start, end)``: fully covered regions are uniform now, the partially
        covered head and tail regions are recomputed."""
        for level in HUGE_LEVELS:
            n = level_pages(level)
            first_full, last_full = -(-start // n), end // n
            if first_full < last_full:
                slot.mixed[level].set(first_full, last_full, False)
            for r in {start // n, (end - 1) // n}:
                if (r * n < start or (r + 1) * n > end) and slot.contains_region(r * n, level):
                    slot.mixed[level].set(r, r + 1, not self.attributes.is_uniform(r * n, (r + 1) * n))

    # --- KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_ioctl_set_mem_attributes) --------------------------------------------------

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int) -> None:
        if not self.profile.sw_protected:
            raise KvmError(errno.ENOTTY, attrs.OP, "memory attributes are not compiled into this kernel")
        start, end = attrs.validate(address, size, attributes, flags, supported_attributes(self.profile, self))
        run_steps(self.set_memory_attributes_steps(start, end, attributes))

    def set_memory_attributes_steps(self, start: int, end: int, attributes: int) -> Steps[None]:
        """kvm_vm_set_mem_attributes on gfns ``[start, end)`` (arguments already validated)."""
        mmu = self.mmu
        yield Step("kvm_vm_set_mem_attributes: mutex_lock(slots_lock)", take=(self.slots_klock,))
        if self.attributes.has(start, end, attributes):
            yield Step("mutex_unlock(slots_lock): unchanged", drop=(self.slots_klock,))
            return  # 7. no-op: no zap
        touched = [s for space in self.memslots for s in space.overlapping(start, end)]
        pre = [s for s in touched if s.as_id == 0]
        ranges = [(max(start, s.base_gfn), min(end, s.end_gfn)) for s in pre]
        if pre:
            # pre pass: the first overlapping slot takes mmu_lock and begins the invalidation
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_begin; kvm_arch_pre_set_memory_attributes: range_add, "
                       "unmap", take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_begin()
            going_private = bool(attributes & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            for s, (lo, hi) in zip(pre, ranges, strict=True):
                if BUG_ATTR_NO_RANGE_ADD not in self.bugs:
                    mmu.invalidate_range_add(lo, hi)
                    if BUG_NO_HUGEPAGE_HEAD_TAIL not in self.bugs:
                        for a, b in self._head_tail_regions(s, lo, hi):
                            mmu.invalidate_range_add(a, b)
                if going_private and not s.can_be_private and BUG_SKIP_SHARED_ONLY_SLOTS in self.bugs:
                    continue
                mmu.zap(lo, hi)
            yield Step("kvm_flush_remote_tlbs; KVM_MMU_UNLOCK")
            mmu.notify_zaps(ranges)
        yield Step("xa_store: store the attributes", guard=mmu.klock)
        self._mutating("attributes", start, end)
        self.attributes.store(start, end, attributes)
        if pre:
            # post pass: end the invalidation and recompute "mixed" in the same mmu_lock hold
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; kvm_arch_post_set_memory_attributes; KVM_MMU_UNLOCK",
                       take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_end()
            for s in touched:
                self._update_mixed(s, start, end)
        else:
            yield Step("recompute mixed", guard=mmu.klock)
            for s in touched:
                self._update_mixed(s, start, end)
        yield Step("mutex_unlock(slots_lock)", drop=(self.slots_klock,))

    def _head_tail_regions(self, slot: Memslot, lo: int, hi: int) -> list[tuple[int, int]]:
        """The huge regions a change of ``[lo, hi)`` covers only partly and that are not "mixed" yet: a fault
        must not map them huge while the change is in flight."""
        out = []
        for level in HUGE_LEVELS:
            n = level_pages(level)
            for r in {lo // n, (hi - 1) // n}:
                partial = r * n < lo or (r + 1) * n > hi
                if partial and slot.contains_region(r * n, level) and not slot.mixed[level].get(r):
                    out.append((r * n, (r + 1) * n))
        return out

    # --- guest_memfd file operations (kvm_gmem_fallocate, kvm_gmem_release, kvm_gmem_error_folio) ---------------------

    def gmem_fallocate(self, file: GmemFile, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd: ``vfs_fallocate``'s checks, then ``kvm_gmem_fallocate``'s, which
        dispatches to :meth:`gmem_punch` or :meth:`gmem_allocate`."""
        op = "fallocate"
        off, ln = _vfs_fallocate(mode, offset, length)
        # kvm_gmem_fallocate
        if not mode & uapi.FALLOC_FL_KEEP_SIZE:
            raise KvmError(errno.EOPNOTSUPP, op, "guest_memfd requires KEEP_SIZE")
        if mode & ~(uapi.FALLOC_FL_KEEP_SIZE | uapi.FALLOC_FL_PUNCH_HOLE):
            raise KvmError(errno.EOPNOTSUPP, op, "guest_memfd supports only allocate and punch hole")
        if off % uapi.PAGE_SIZE or ln % uapi.PAGE_SIZE:
            raise KvmError(errno.EINVAL, op, "offset or len not page aligned")
        if mode & uapi.FALLOC_FL_PUNCH_HOLE:
            self.gmem_punch(file, off >> uapi.PAGE_SHIFT, (off + ln) >> uapi.PAGE_SHIFT)
        else:
            self.gmem_allocate(file, off, ln)

    def gmem_allocate(self, file: GmemFile, offset: int, length: int) -> None:
        """``kvm_gmem_allocate``: a range reaching past EOF is EINVAL (the file never grows); then every missing
        page of ``[offset, offset + length)`` is allocated, zeroed."""
        op = "fallocate"
        inode = file.inode
        first, last = offset >> uapi.PAGE_SHIFT, (offset + length) >> uapi.PAGE_SHIFT
        if offset + length > inode.size:
            raise KvmError(errno.EINVAL, op, "allocation range beyond the end of the file")
        if inode.backing.address(first) is None:
            raise KvmError(errno.ENOMEM, op, "guest_memfd storage could not be mapped")
        run_steps(self.gmem_allocate_steps(file, first, last))

    def gmem_allocate_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """kvm_gmem_allocate: allocate (zeroed) folios under the inode's invalidate_lock; no invalidation,
        an absent page is mapped by nobody."""
        inv = file.inode.invalidate_lock
        yield Step("filemap_invalidate_lock; kvm_gmem_get_folio...", take=(inv,) if inv else (),
                   drop=(inv,) if inv else (), guard=self.mmu.klock)  # fmt: skip
        file.inode.materialise(first, last)

    def gmem_punch(self, file: GmemFile, first: int, last: int) -> None:
        """PUNCH_HOLE pages ``[first, last)``: zap every bound gfn, then free (no bounds check)."""
        with self.slots_lock:
            run_steps(self.gmem_punch_steps(file, first, last))

    def gmem_punch_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """kvm_gmem_punch_hole: under invalidate_lock, begin+zap in every VM bound to the range, truncate,
        then end in every VM."""
        inode = file.inode
        inv = inode.invalidate_lock
        assert inv is not None
        yield Step("kvm_gmem_punch_hole: filemap_invalidate_lock", take=(inv,))
        lo, hi = self._folio_range(inode, first, last)
        opened = yield from self._gmem_invalidate_begin(list(inode.files), lo, hi)
        if BUG_PUNCH_NO_TRUNCATE not in self.bugs:
            yield Step("truncate_inode_pages_range", guard=self.mmu.klock)
            for f in inode.files:
                for a, b in f.gfn_ranges(first, last):
                    f.vm._mutating("truncate", a, b)
            inode.free(first, last)
        yield from self._gmem_invalidate_end(inode, lo, hi, opened)
        yield Step("filemap_invalidate_unlock", drop=(inv,))

    @staticmethod
    def _folio_range(inode: GmemInode, first: int, last: int) -> tuple[int, int]:
        """A huge-page file invalidates whole folios: no 2 MiB mapping may outlive part of its folio."""
        if inode.hugepage:
            first -= first % HUGE_FOLIO_PAGES
            last = -(-last // HUGE_FOLIO_PAGES) * HUGE_FOLIO_PAGES
        return first, last

    def _gmem_invalidate_begin(self, files: list[GmemFile], first: int, last: int) -> Steps[list[GmemFile]]:
        """kvm_gmem_invalidate_begin: per VM file (all of the inode's, or only the releasing one), the first
        binding overlapping the range takes that VM's mmu_lock and begins; every bound gfn range is added and
        zapped. Returns the files whose VM began."""
        opened = []
        for f in files:
            ranges = f.gfn_ranges(first, last)
            if not ranges and BUG_GMEM_START_UNCONDITIONAL not in self.bugs:
                continue
            yield from f.vm.mmu.invalidate_steps(ranges, force=True, flush="kvm_flush_remote_tlbs")
            opened.append(f)
        return opened

    def _gmem_invalidate_end(self, inode: GmemInode, first: int, last: int, opened: list[GmemFile]) -> Steps[None]:
        """kvm_gmem_invalidate_end: ends in every VM file whose bindings overlap the range."""
        for f in opened:
            if not f.gfn_ranges(first, last):
                continue  # with gmem_start_unconditional, a begin with no binding is never ended
            mmu = f.vm.mmu
            yield Step("KVM_MMU_LOCK; kvm_mmu_invalidate_end; KVM_MMU_UNLOCK", take=(mmu.klock,),
                       drop=(mmu.klock,))  # fmt: skip
            mmu.invalidate_end()

    def gmem_poison(self, file: GmemFile, pgoff: int) -> None:
        """Memory failure on page ``pgoff`` (``kvm_gmem_error_folio``): zap bound gfns, mark hwpoison, do not
        truncate."""
        if not 0 <= pgoff < file.inode.npages:
            raise KvmError(errno.EINVAL, "inject_poison", f"page {pgoff:#x} beyond the end of the file")
        with self.slots_lock:
            run_steps(self._poison_steps(file, pgoff))

    def _poison_steps(self, file: GmemFile, pgoff: int) -> Steps[None]:
        """kvm_gmem_error_folio: begin/zap, mark the folio, end (no truncation)."""
        inode = file.inode
        lo, hi = self._folio_range(inode, pgoff, pgoff + 1)
        opened = yield from self._gmem_invalidate_begin(list(inode.files), lo, hi)
        yield Step("folio hwpoison", guard=self.mmu.klock)
        inode.poison(pgoff)
        yield from self._gmem_invalidate_end(inode, lo, hi, opened)

    def release_gmem_file(self, file: GmemFile) -> None:
        """Last reference to a guest_memfd file dropped (``kvm_gmem_release``). Caller holds ``slots_lock``."""
        with self.slots_lock:
            run_steps(self.release_gmem_file_steps(file))
            self.put()

    def release_gmem_file_steps(self, file: GmemFile) -> Steps[None]:
        """kvm_gmem_release: slots_lock -> invalidate_lock; clear every bound slot's file pointer, begin+zap
        and end over the whole file, unlink the file; the inode's memory lives on while other files use it."""
        inode = file.inode
        inv = inode.invalidate_lock
        assert inv is not None
        yield Step("kvm_gmem_release: mutex_lock(slots_lock)", take=(self.slots_klock,))
        yield Step("filemap_invalidate_lock", take=(inv,))
        yield Step("WRITE_ONCE(slot->gmem.file, NULL) for every binding", guard=self.mmu.klock)
        for _s, _e, slot in list(file.bound_pieces(0, 1 << 64)):
            if slot.freed:
                self.kasan.append(f"kvm_gmem_release: write to freed memslot {slot.id} (slot->gmem.file)")
            if slot.gmem is file:
                slot.gmem = None
        opened = yield from self._gmem_invalidate_begin([file], 0, 1 << 64)  # only this VM's view
        yield from self._gmem_invalidate_end(inode, 0, 1 << 64, opened)
        yield Step("list_del(&f->entry); free the bindings", guard=self.mmu.klock)
        file.bindings.set(0, 1 << 64, None)
        file.released = True
        inode.files.remove(file)
        last = not inode.files
        if last:
            yield Step("last file: evict the inode")
            for cb in list(self.gmem_release_listeners):
                cb(inode)
            yield Step("truncate_inode_pages_final", guard=self.mmu.klock)
            inode.destroy()
        if file in self.gmem_files:
            self.gmem_files.remove(file)
        yield Step("filemap_invalidate_unlock; mutex_unlock(slots_lock)", drop=(inv, self.slots_klock))

    # --- the fault path ------------------------------------------------------------------------------------

    def handle_fault(
        self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None
    ) -> FaultResult:
        """The CPU layer's entry point (contract in ``core/mmu.py``)."""
        return self.mmu.fault(gpa, write, fetch, private)

    # --- introspection ---------------------------------------------------------------------------------------

    def introspect(self) -> dict[str, Any]:
        """A snapshot for tests and tools: SPTEs, attributes, memslots, guest_memfd pages, counters."""
        with self.slots_lock, self.mmu.lock:
            return {
                "sptes": [
                    {
                        "gfn": s.gfn,
                        "level": s.level,
                        "npages": s.npages,
                        "backing": s.backing,
                        "host_address": s.host_address,
                        "writable": s.writable,
                        "private": s.private,
                        "slot": s.slot.slot,
                        "gmem_ino": s.gmem.ino if s.gmem else None,
                        "pgoff": s.pgoff if s.gmem else None,
                    }
                    for s in self.mmu.sptes()
                ],
                "attributes": [(a, b, v) for a, b, v in self.attributes.runs() if v],
                "attribute_runs": len(self.attributes),
                "memslots": [
                    {
                        "slot": s.slot,
                        "base_gfn": s.base_gfn,
                        "npages": s.npages,
                        "flags": s.flags,
                        "userspace_addr": s.userspace_addr,
                        "gmem_ino": s.gmem.inode.ino if s.gmem else None,
                        "pgoff": s.pgoff,
                        "gmem_only": s.gmem_only,
                        "mixed": {lv: [(a, b) for a, b, v in s.mixed[lv].runs() if v] for lv in HUGE_LEVELS},
                    }
                    for space in self.memslots
                    for s in space
                ],
                "gmem": [
                    {
                        "ino": f.inode.ino,
                        "size": f.inode.size,
                        "flags": f.inode.flags,
                        "refs": f.refs,
                        "pages": [
                            (a, b, PAGE_STATE_NAMES[v]) for a, b, v in f.inode.pages.pieces(0, f.inode.npages) if v
                        ],
                        "pages_present": f.inode.nr_present,
                        "pages_allocated": f.inode.pages_allocated,
                        "pages_freed": f.inode.pages_freed,
                        "bindings": [(a, b, s.slot) for a, b, s in f.bound_pieces(0, 1 << 64)],
                    }
                    for f in self.gmem_files
                ],
                "counters": dict(vars(self.mmu.counters)),
                "mmu_seq": self.mmu.seq,
                "refs": self.refs,
                "hypercall_exit_mask": self.hypercall_exit_mask,
                "disabled_quirks": self.disabled_quirks,
            }


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value
