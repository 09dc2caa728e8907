"""KVM_SET_USER_MEMORY_REGION(2) of one VM: ``__kvm_set_memory_region`` and ``kvm_set_memslot``
(``virt/kvm/kvm_main.c``), as kernel-step generators.

Why the order matters: the errnos come in the kernel's order — argument checks (``check_region``) before the
table lookup, deleting a missing slot or changing what may not change (EINVAL) before the GPA overlap (EEXIST),
the overlap before the guest_memfd bind checks (``kvm_gmem_bind``, ``core/gmem_ops.py``), the bind before the
arch range check — and the commit follows ``kvm_set_memslot``: a slot that goes away or moves is first published
INVALID so faults on it retry, SRCU readers drain, its SPTEs are zapped, the new memslots are published once no
mm-notifier invalidation is between start and end (``core/mmu_notifier.py``), SRCU drains again, and only then
is the old slot freed and unbound (``kvm_gmem_unbind``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .gmem import GmemFile
from .lpage import init_mixed
from .memslots import OP_V1, OP_V2, AddressSpace, Memslot, MemslotChange, check_region
from .quirks import flush_zaps_all
from .steps import BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP, Step, Steps, run_steps

if TYPE_CHECKING:
    from .gmem_ops import FdLookup
    from .vm import VmCore


class MemslotOps:
    """The memslot half of ``kvm_main.c`` for one VM; the memslots themselves are ``VmCore.memslots``."""

    def __init__(self, vm: VmCore) -> None:
        self.vm = vm

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
        """``__kvm_set_memory_region``; all integer arguments are the raw u32/u64 field values (``guest_memfd``
        the u32 fd field)."""
        vm = self.vm
        profile = vm.profile
        op = OP_V2 if v2 else OP_V1
        if not v2:
            guest_memfd_offset = 0
        check_region(
            profile, vm.has_private_mem, vm.nr_address_spaces, v2, slot, flags,
            guest_phys_addr, memory_size, userspace_addr, guest_memfd_offset,
        )  # fmt: skip
        as_id, slot_id = slot >> 16, slot & 0xFFFF
        space = vm.memslots[as_id]
        base_gfn, npages = guest_phys_addr >> uapi.PAGE_SHIFT, memory_size >> uapi.PAGE_SHIFT
        with vm.slots_lock:
            old = space.get(slot_id)
            change = self._change(op, f"{as_id}:{slot_id}", old, base_gfn, npages, flags, userspace_addr)
            if change is None:
                assert old is not None
                old.hva_live = hva_live  # no-op for KVM; the adapter re-pinned the same memory
                return
            if change is MemslotChange.DELETE:
                run_steps(self.set_memslot_steps(space, old, None, change))
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
            file: GmemFile | None = None
            if flags & uapi.KVM_MEM_GUEST_MEMFD:
                file = vm.gmem_ops.bind_check(op, new, guest_memfd, guest_memfd_offset, fd_lookup)
            # N. arch commit: the slot must end below the maximum guest physical address
            if new_range and base_gfn + npages - 1 > profile.max_gfn:
                raise KvmError(errno.EINVAL, op, f"slot ends above the {profile.max_gpa_bits}-bit GPA limit")
            init_mixed(new, vm.attributes)
            if file is not None:
                new.gmem, new.pgoff = file, guest_memfd_offset >> uapi.PAGE_SHIFT
                new.gmem_only = profile.gmem_only_slots and file.inode.mmap_allowed
            run_steps(self.set_memslot_steps(space, old, new, change))

    def _change(
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
        if self.vm.profile.reject_gmem_flag_toggle:
            toggle |= uapi.KVM_MEM_GUEST_MEMFD
        if userspace_addr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & toggle:
            raise KvmError(errno.EINVAL, op, "userspace_addr, size or READONLY/GUEST_MEMFD changed")
        if base_gfn != old.base_gfn:
            return MemslotChange.MOVE
        if flags != old.flags:
            return MemslotChange.FLAGS_ONLY
        return None

    def set_memslot_steps(
        self, space: AddressSpace, old: Memslot | None, new: Memslot | None, change: MemslotChange
    ) -> Steps[None]:
        """``kvm_set_memslot``: one sequence per kind of change. Delete and move do not use the invalidation
        sequence: the old slot is published INVALID (faults on it retry), SRCU readers drain, the slot is
        zapped, the new memslots are published, SRCU drains again, and only then is the old slot freed
        (``kvm_gmem_unbind``). Caller holds slots_lock."""
        if change is MemslotChange.CREATE:
            assert old is None and new is not None
            yield from self._create(space, new)
        elif change is MemslotChange.DELETE:
            assert old is not None and new is None
            yield from self._delete(space, old)
        elif change is MemslotChange.MOVE:
            assert old is not None and new is not None
            yield from self._move(space, old, new)
        else:
            assert old is not None and new is not None
            yield from self._update_flags(space, old, new)

    def _create(self, space: AddressSpace, new: Memslot) -> Steps[None]:
        """``kvm_create_memslot``: nothing maps the range yet, so only the publish."""
        yield from self._swap()
        self._install(space, new)

    def _delete(self, space: AddressSpace, old: Memslot) -> Steps[None]:
        """``kvm_delete_memslot``, after ``kvm_invalidate_memslot``."""
        yield from self._invalidate(space, old)
        yield from self._swap()
        self._remove(space, old)
        yield from self._free(old)

    def _move(self, space: AddressSpace, old: Memslot, new: Memslot, flags_only: bool = False) -> Steps[None]:
        """``kvm_move_memslot``, after ``kvm_invalidate_memslot``: the new slot replaces the old one."""
        yield from self._invalidate(space, old, flags_only)
        yield from self._swap()
        self._remove(space, old)
        self._install(space, new)
        yield from self._free(old)

    def _update_flags(self, space: AddressSpace, old: Memslot, new: Memslot) -> Steps[None]:
        """``kvm_update_flags_memslot`` with the arch commit's zap. The kernel swaps the slot in place and
        ``kvm_mmu_slot_apply_flags`` zaps or write-protects what dirty logging needs; the sim zaps the whole
        slot through the same INVALID-slot sequence as a move, which is never less safe; only the slot, as
        ``kvm_mmu_slot_apply_flags`` touches no other (no ``kvm_arch_flush_shadow_memslot``, no zap-all quirk)."""
        yield from self._move(space, old, new, flags_only=True)

    def _invalidate(self, space: AddressSpace, old: Memslot, flags_only: bool = False) -> Steps[None]:
        """``kvm_invalidate_memslot``: publish the INVALID slot, drain SRCU, then ``kvm_arch_flush_shadow_memslot``:
        zap every SPTE of the VM (KVM_X86_QUIRK_SLOT_ZAP_ALL, ``flush_zaps_all``) or only the slot's (the sim's
        SPTEs are all address space 0's, so an SMM slot has none)."""
        vm = self.vm
        mmu = vm.mmu
        yield Step("kvm_invalidate_memslot: publish the INVALID slot", guard=mmu.klock)
        old.invalid = True  # concurrent faults on it retry
        yield Step("kvm_swap_active_memslots: synchronize_srcu_expedited", wait=self._srcu_idle)
        zap_all = not flags_only and flush_zaps_all(vm.profile, vm.vm_type, vm.disabled_quirks)
        if zap_all or space.as_id == 0:
            how = "kvm_mmu_zap_all_fast" if zap_all else "kvm_mmu_zap_memslot"
            yield Step(f"kvm_arch_flush_shadow_memslot: write_lock(mmu_lock); {how}",
                       take=(mmu.klock,), drop=(mmu.klock,))  # fmt: skip
            lo, hi = (0, vm.profile.max_gfn + 1) if zap_all else (old.base_gfn, old.end_gfn)
            mmu.zap(lo, hi)
            yield Step("kvm_flush_remote_tlbs")
            mmu.notify_zap(lo, hi)

    def _swap(self) -> Steps[None]:
        """``kvm_swap_active_memslots``: wait until no mm-notifier invalidation is between start and end."""
        vm = self.vm
        if BUG_NOTIFIER_IGNORES_MEMSLOT_SWAP in vm.bugs:
            yield Step("kvm_swap_active_memslots: publish the new memslots (no wait)", guard=vm.mmu.klock)
        else:
            yield Step("kvm_swap_active_memslots: wait for mn_active_invalidate_count == 0; publish the new memslots",
                       guard=vm.mmu.klock, wait=vm.mmu_notifier.idle)  # fmt: skip

    def _remove(self, space: AddressSpace, old: Memslot) -> None:
        self.vm.mutating("memslot", old.base_gfn, old.end_gfn)
        space.remove(old)

    @staticmethod
    def _install(space: AddressSpace, new: Memslot) -> None:
        if new.gmem is not None:
            new.gmem.bindings.set(new.pgoff, new.pgoff + new.npages, new)
        space.install(new)

    def _free(self, old: Memslot) -> Steps[None]:
        """``kvm_free_memslot`` after the second SRCU drain: unbind the guest_memfd (``kvm_gmem_unbind``)."""
        inv = old.gmem.inode.invalidate_lock if old.gmem is not None else None
        yield Step("synchronize_srcu; kvm_free_memslot: kvm_gmem_unbind", wait=self._srcu_idle,
                   take=(inv,) if inv else (), drop=(inv,) if inv else (), guard=self.vm.mmu.klock)  # fmt: skip
        self.vm.gmem_ops.unbind(old)
        old.freed = True

    def _srcu_idle(self) -> bool:
        """``synchronize_srcu``'s condition: no vCPU is inside a fault's SRCU read section."""
        return self.vm.srcu_readers == 0
