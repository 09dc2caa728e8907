"""KVM_PRE_FAULT_MEMORY: map a gpa range ahead of the guest through the VM's own fault path.

Why a model of its own: the ioctl is the one way a VMM can populate SPTEs without running the guest, and its
contract is subtle — it succeeds if *any* page was mapped (the caller loops on the leftover range it writes
back), fails only when no progress was made, and reports the MMIO case (no memslot) as ENOENT, a memslot
being deleted under it as EAGAIN and a pending signal as EINTR. Each page goes through ``Mmu.fault`` exactly
as a guest access would (private pages from the guest_memfd, shared pages from the hva), so what a prefault
maps is what the guest would have faulted in.

Mirrors ``kvm_vcpu_pre_fault_memory`` (virt/kvm/kvm_main.c) and ``kvm_arch_vcpu_pre_fault_memory`` /
``kvm_tdp_page_prefault`` (arch/x86/kvm/mmu/mmu.c). One simplification: the kernel holds the VM's SRCU read
lock for the whole ioctl, so a memslot deletion racing with it waits in ``synchronize_srcu`` after marking
the slot INVALID (the prefault then fails that page with EAGAIN). The sim's faults take ``mmu_lock`` per
page and a deletion does not wait for the ioctl, so a racing deletion may also complete between two pages,
and the next page then sees no memslot (ENOENT, or EFAULT for a private page). Both outcomes are ones the
kernel's ABI allows and callers (``pre_fault_memory_test``) must handle: retry after recreating the slot.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from ..fault import Mapped, MemoryFault, Mmio, Retry

if TYPE_CHECKING:
    from .vm import VmCore

OP = "KVM_PRE_FAULT_MEMORY"


def check_range(gpa: int, size: int, flags: int) -> None:
    """``kvm_vcpu_pre_fault_memory``'s argument checks: EINVAL for flags ≠ 0, an unaligned gpa or size, a
    size of 0 or a range that wraps past 2^64. The padding words are not checked (the kernel ignores them)."""
    if flags:
        raise KvmError(errno.EINVAL, OP, f"flags {flags:#x} must be 0")
    if gpa % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, OP, f"gpa {gpa:#x} and size {size:#x} must be page aligned")
    if (gpa + size) & uapi.MASK64 <= gpa:
        raise KvmError(errno.EINVAL, OP, f"empty or wrapping range gpa={gpa:#x} size={size:#x}")


def pre_fault_memory(vm: VmCore, gpa: int, size: int, flags: int, interrupted: Callable[[], bool]) -> tuple[int, int]:
    """The whole ioctl: returns the leftover ``(gpa, size)`` (size 0 when everything was mapped).

    ``interrupted()`` is the vCPU thread's ``signal_pending(current)``: asked before every page, and while
    a page is retried behind an invalidation. Raises ``KvmError`` — with the range untouched — only when no
    page was mapped; after progress, an error ends the loop and the partial result is returned, as the
    kernel returns 0 with the range advanced (``full_size == range->size ? r : 0``).
    """
    profile = vm.profile
    if not profile.pre_fault_memory:
        raise KvmError(errno.EINVAL, OP, f"no KVM_PRE_FAULT_MEMORY before 6.10 (profile {profile.name})")
    check_range(gpa, size, flags)
    full = size
    while size:
        try:
            if interrupted():
                raise KvmError(errno.EINTR, OP, "signal pending")
            mapped = _arch_pre_fault(vm, gpa, size, interrupted)
        except KvmError:
            if size == full:
                raise
            break
        gpa, size = gpa + mapped, size - mapped
    return gpa, size


def _arch_pre_fault(vm: VmCore, gpa: int, size: int, interrupted: Callable[[], bool]) -> int:
    """``kvm_arch_vcpu_pre_fault_memory`` for one mapping: the bytes of ``[gpa, gpa + size)`` now mapped."""
    profile = vm.profile
    # pre_fault_allowed: DEFAULT and SW_PROTECTED VMs (the only types the sim creates) from the start.
    if not profile.tdp:
        raise KvmError(errno.EOPNOTSUPP, OP, "shadow paging: the MMU is not indexed by gpa (kvm_tdp_page_prefault)")
    gfn = gpa >> uapi.PAGE_SHIFT
    # error_code = PFERR_GUEST_FINAL_MASK, plus PFERR_PRIVATE_ACCESS where the attribute says private: a read.
    private = vm.has_private_mem and vm.attributes.is_private(gfn)
    while True:  # kvm_tdp_page_prefault: RET_PF_RETRY loops, checking for signals first
        if interrupted():
            raise KvmError(errno.EINTR, OP, "signal pending")
        result = vm.mmu.fault(gpa, write=False, fetch=False, private=private)
        if isinstance(result, Mapped):
            end = result.gpa + result.size  # a huge mapping may end past the page asked for
            return min(size, end - gpa)
        if isinstance(result, Mmio):  # RET_PF_EMULATE: no memslot, the access would be emulated MMIO
            raise KvmError(errno.ENOENT, OP, f"gpa {gpa:#x} is not in a memslot")
        if isinstance(result, MemoryFault):  # kvm_mmu_prepare_memory_fault_exit; the errno comes back
            raise KvmError(result.errno, OP, f"gpa {gpa:#x}: the fault needs the VMM (memory fault exit)")
        assert isinstance(result, Retry)
        if result.invalid_slot:  # KVM_MEMSLOT_INVALID on a prefetch fault
            raise KvmError(errno.EAGAIN, OP, f"the memslot of gpa {gpa:#x} is being deleted or moved")
        time.sleep(0)  # an invalidation is in progress on another thread: let it finish (cond_resched)
