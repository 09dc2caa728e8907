"""The VM (struct kvm): the one object the sim's adapters and the interleaving checker talk to.

Why a facade over components: ``VmCore`` holds the VM's state — memslots, attributes, guest_memfd files, refs,
``slots_lock``, the MMU — and its lifetime, caps and vCPU limits; each ioctl-level operation lives with the kernel
file it models, as kernel-step generators in the kernel's order (``core/steps.py``):

- ``memslot_ops.MemslotOps``: KVM_SET_USER_MEMORY_REGION(2), ``__kvm_set_memory_region``, ``kvm_set_memslot``;
- ``attribute_ops.AttributeOps``: KVM_SET_MEMORY_ATTRIBUTES, ``kvm_vm_set_mem_attributes``;
- ``gmem_ops.GmemOps``: ``guest_memfd.c`` — create, bind/unbind, fallocate, punch hole, poison, release;
- ``mmu_notifier.MmuNotifier``: ``kvm_mmu_notifier_invalidate_range_start``/``_end``;
- ``mmu.Mmu``: SPTEs, the fault path and the invalidation protocol (``kvm_mmu_invalidate_begin``/``_end``).

The methods below keep one name per operation for the adapters and the checker and delegate to those.

Locks: ``slots_lock`` (an RLock, KVM's slots_lock) serialises the ioctl-level operations of one VM and its
guest_memfds; ``mmu.lock`` (KVM's mmu_lock) guards what the fault path reads and is only held for short
sections, never while zap listeners run. vCPU threads take only ``mmu.lock``.
"""

from __future__ import annotations

import errno
import itertools
import threading
from collections.abc import Callable
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from ..fault import FaultResult
from .attribute_ops import AttributeOps
from .attributes import AttributeMap
from .caps import check_extension
from .gmem import Backing, GmemFile, GmemInode
from .gmem_ops import Fd as Fd
from .gmem_ops import FdLookup, GmemOps
from .hypercall import HypercallUserExit, emulate_hypercall
from .introspect import introspect
from .memslot_ops import MemslotOps
from .memslots import AddressSpace, Memslot, MemslotChange
from .mmu import Mmu, ZapListener
from .mmu_notifier import MmuNotifier
from .profile import Profile
from .quirks import disable_quirks
from .steps import RANK_SLOTS_LOCK, KLock, Step, Steps, run_steps
from .x86_vm import X86Vm

_vm_numbers = itertools.count(1)

#: ``VmCore.mutation_hook(kind, gfn_start, gfn_end)``: called when a writer changes what a gfn translates to
#: ("attributes", "truncate", "unbind", "memslot", "hva"); the interleaving checker asserts nothing maps it then.
MutationHook = Callable[[str, int, int], None]


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
        self.memslot_ops = MemslotOps(self)
        self.attribute_ops = AttributeOps(self)
        self.gmem_ops = GmemOps(self)
        self.mmu_notifier = MmuNotifier(self)

    # --- lifetime --------------------------------------------------------------------------------------

    def get(self) -> None:
        """Take a reference (``kvm_get_kvm``): a vCPU fd or a guest_memfd file keeps the VM alive."""
        with self.slots_lock:
            self.refs += 1

    def put(self) -> None:
        """Drop a reference (VM fd, vCPU fd, or a released guest_memfd file); the last destroys the VM."""
        with self.slots_lock:
            self.refs -= 1
            if self.refs == 0:
                self._destroy()

    def _destroy(self) -> None:
        """``kvm_destroy_vm``: zap and free the memslots, then tell the adapters (they unmap what they own)."""
        self.destroyed = True
        run_steps(self._destroy_steps())
        for cb in list(self.destroy_listeners):
            cb()

    def _destroy_steps(self) -> Steps[None]:
        """The memslots go inside an invalidation, as ``kvm_destroy_vm`` runs the mmu notifier's release and
        ``kvm_arch_flush_shadow_all`` first: no CPU may keep a translation into memory the VM gives back."""
        ranges = [(s.base_gfn, s.end_gfn) for s in self.memslots[0]]
        yield from self.mmu.invalidate_steps(ranges)
        yield Step("kvm_destroy_vm: free memslots", guard=self.mmu.klock)
        for space in self.memslots:
            for slot in space:
                space.remove(slot)
                slot.gmem = None  # no file can still be bound: files pin the VM
        yield from self.mmu.end_steps(ranges)

    def mutating(self, kind: str, lo: int, hi: int) -> None:
        """Tell the checker's ``mutation_hook`` that gfns ``[lo, hi)`` change what they translate to."""
        if self.mutation_hook is not None and hi > lo:
            self.mutation_hook(kind, lo, hi)

    def add_zap_listener(self, callback: ZapListener) -> None:
        """See the contract in ``core/mmu.py``."""
        self.mmu.zap_listeners.append(callback)

    def remove_zap_listener(self, callback: ZapListener) -> None:
        """Unregister a zap listener; one never registered (or already removed) is ignored."""
        if callback in self.mmu.zap_listeners:
            self.mmu.zap_listeners.remove(callback)

    def add_gmem_release_listener(self, callback: Callable[[GmemInode], None]) -> None:
        """See "Storage release" in ``core/mmu.py``: called before an inode's storage is unmapped."""
        self.gmem_release_listeners.append(callback)

    # --- KVM_CHECK_EXTENSION / KVM_ENABLE_CAP -------------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (``kvm_vm_ioctl_check_extension``): some answers depend on the VM type."""
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

    def emulate_hypercall(self, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallUserExit:
        """``kvm_emulate_hypercall`` for a vCPU of this VM (``core/hypercall.py``) with its KVM_CAP_EXIT_HYPERCALL
        mask, which only the core holds."""
        return emulate_hypercall(self.hypercall_exit_mask, cpl, nr, a0, a1, a2, a3)

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

    # --- KVM_CREATE_GUEST_MEMFD and guest_memfd file operations (GmemOps) -----------------------------------------

    def create_guest_memfd(self, size: int, flags: int, backing: Callable[[int], Backing]) -> GmemFile:
        """KVM_CREATE_GUEST_MEMFD (``kvm_gmem_create``)."""
        return self.gmem_ops.create(size, flags, backing)

    def gmem_fallocate(self, file: GmemFile, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a guest_memfd (``vfs_fallocate``, ``kvm_gmem_fallocate``)."""
        self.gmem_ops.fallocate(file, mode, offset, length)

    def gmem_allocate(self, file: GmemFile, offset: int, length: int) -> None:
        """``kvm_gmem_allocate`` of bytes ``[offset, offset + length)``."""
        self.gmem_ops.allocate(file, offset, length)

    def gmem_allocate_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """``kvm_gmem_allocate`` of pages ``[first, last)``, as kernel steps."""
        return self.gmem_ops.allocate_steps(file, first, last)

    def gmem_punch(self, file: GmemFile, first: int, last: int) -> None:
        """PUNCH_HOLE pages ``[first, last)`` (``kvm_gmem_punch_hole``)."""
        self.gmem_ops.punch(file, first, last)

    def gmem_punch_steps(self, file: GmemFile, first: int, last: int) -> Steps[None]:
        """``kvm_gmem_punch_hole`` of pages ``[first, last)``, as kernel steps."""
        return self.gmem_ops.punch_steps(file, first, last)

    def gmem_poison(self, file: GmemFile, pgoff: int) -> None:
        """Memory failure on page ``pgoff`` (``kvm_gmem_error_folio``)."""
        self.gmem_ops.poison(file, pgoff)

    def release_gmem_file(self, file: GmemFile) -> None:
        """Last reference to a guest_memfd file dropped (``kvm_gmem_release``)."""
        self.gmem_ops.release(file)

    def release_gmem_file_steps(self, file: GmemFile) -> Steps[None]:
        """``kvm_gmem_release``, as kernel steps."""
        return self.gmem_ops.release_steps(file)

    # --- KVM_SET_USER_MEMORY_REGION(2) (MemslotOps) --------------------------------------------------------------

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
        self.memslot_ops.set_user_memory_region(
            v2=v2, slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=memory_size,
            userspace_addr=userspace_addr, guest_memfd=guest_memfd, guest_memfd_offset=guest_memfd_offset,
            hva_live=hva_live, fd_lookup=fd_lookup,
        )  # fmt: skip

    def set_memslot_steps(
        self, space: AddressSpace, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> Steps[None]:
        """``kvm_set_memslot``, as kernel steps (caller holds slots_lock)."""
        return self.memslot_ops.set_memslot_steps(space, old, new, change)

    # --- KVM_SET_MEMORY_ATTRIBUTES (AttributeOps) ----------------------------------------------------------------

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES (``kvm_vm_ioctl_set_mem_attributes``)."""
        self.attribute_ops.set_memory_attributes(address, size, attributes, flags)

    def set_memory_attributes_steps(self, start: int, end: int, attributes: int) -> Steps[None]:
        """``kvm_vm_set_mem_attributes`` on gfns ``[start, end)``, as kernel steps."""
        return self.attribute_ops.set_memory_attributes_steps(start, end, attributes)

    # --- the mm notifier (MmuNotifier) and the fault path (Mmu) --------------------------------------------------

    def mmu_notifier_invalidate_steps(self, hva_start: int, hva_end: int) -> Steps[None]:
        """``kvm_mmu_notifier_invalidate_range_start``/``_end`` around a host change, as kernel steps."""
        return self.mmu_notifier.invalidate_steps(hva_start, hva_end)

    def handle_fault(
        self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None
    ) -> FaultResult:
        """The CPU layer's entry point (contract in ``core/mmu.py``)."""
        return self.mmu.fault(gpa, write, fetch, private)

    def introspect(self) -> dict[str, Any]:
        """A snapshot for tests and tools: SPTEs, attributes, memslots, guest_memfd pages, counters."""
        return introspect(self)
