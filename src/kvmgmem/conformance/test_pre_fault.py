"""KVM_PRE_FAULT_MEMORY (pre_fault_memory_test.c; ``kvm_vcpu_pre_fault_memory``,
``kvm_arch_vcpu_pre_fault_memory``, ``kvm_tdp_page_prefault``).

The argument checks come before the architecture's, so they hold on every KVM that has the ioctl; the rest
needs ``KVM_CAP_PRE_FAULT_MEMORY`` (two-dimensional paging): on this host's shadow-paging KVM the cap is 0 and
every valid call fails with EOPNOTSUPP, which ``test_pre_fault_memory_eopnotsupp_without_cap`` checks there.
"""

from __future__ import annotations

import errno

import pytest

import kvmgmem
from kvmgmem import HostMemory, uapi

from ._util import GMEM, P, raises_kvm, require_cap

OP = "KVM_PRE_FAULT_MEMORY"
SIZE = 2 << 20
GPA = 1 << 32  # a 2 MiB-aligned slot, as pre_fault_memory_test aligns its TEST_SLOT


def test_pre_fault_memory_argument_checks(vm: kvmgmem.Vm) -> None:
    """`kvm_vcpu_pre_fault_memory`: EINVAL for flags ≠ 0, an unaligned gpa or size, size 0 and a range that wraps
    past 2^64 — checked before anything else, so even a KVM without TDP answers them."""
    with vm.create_vcpu() as vcpu:
        for gpa, size, flags in ((0, P, 1), (1, P, 0), (0, P + 1, 0), (0, 0, 0), (-P, 2 * P, 0)):
            with raises_kvm(errno.EINVAL, OP):
                vcpu.pre_fault_memory(gpa, size, flags)


def test_pre_fault_memory_eopnotsupp_without_cap(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """Without two-dimensional paging (`KVM_CAP_PRE_FAULT_MEMORY` 0: `r = tdp_enabled`) a valid call fails with
    EOPNOTSUPP from `kvm_tdp_page_prefault`, memslot or not (this host's shadow-paging KVM)."""
    cap = system.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY)
    if cap:
        pytest.skip(f"KVM_CAP_PRE_FAULT_MEMORY = {cap} on backend {backend}: prefaulting is supported")
    with HostMemory(SIZE) as mem, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region(0, GPA, SIZE, mem)
        try:
            with raises_kvm(errno.EOPNOTSUPP, OP):
                vcpu.pre_fault_memory(GPA, P)
        finally:
            vm.set_user_memory_region(0, GPA, 0)


def test_pre_fault_memory_shared_ranges(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """pre_fault_memory_test's three calls on a 2 MiB + 4 KiB slot layout: the first 2 MiB map completely (size 0
    left), a range running one page past the slot maps its first page and returns the rest (success: progress was
    made), and prefaulting the page past the slot fails with ENOENT (RET_PF_EMULATE: no memslot) with the range
    unchanged."""
    require_cap(system, uapi.KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY", backend)
    with HostMemory(SIZE + SIZE) as mem, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region(10, GPA, SIZE + P, mem)
        try:
            assert vcpu.pre_fault_memory(GPA, SIZE) == (GPA + SIZE, 0)
            assert vcpu.pre_fault_memory(GPA + SIZE, 2 * P) == (GPA + SIZE + P, P)
            with raises_kvm(errno.ENOENT, OP):
                vcpu.pre_fault_memory(GPA + SIZE + P, P)
        finally:
            vm.set_user_memory_region(10, GPA, 0)


def test_pre_fault_memory_private_from_guest_memfd(system: kvmgmem.System, protected_vm: kvmgmem.Vm,
                                                   backend: str) -> None:  # fmt: skip
    """The private case of pre_fault_memory_test: on a SW_PROTECTED VM a range whose attribute is PRIVATE is
    faulted in from the guest_memfd (`PFERR_PRIVATE_ACCESS` from `kvm_mem_is_private`), allocating its pages; the
    page after the private range is shared and outside the slot, so it fails with ENOENT."""
    require_cap(system, uapi.KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY", backend)
    vm = protected_vm
    with HostMemory(SIZE) as mem, vm.create_guest_memfd(SIZE) as gmem, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region2(10, GPA, SIZE, mem, GMEM, gmem, 0)
        try:
            vm.set_memory_attributes(GPA, SIZE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert vcpu.pre_fault_memory(GPA, 4 * P) == (GPA + 4 * P, 0)
            allocated = gmem.allocated_bytes()
            assert allocated is None or allocated == 4 * P, f"guest_memfd holds {allocated} bytes, expected 4 pages"
            assert vcpu.pre_fault_memory(GPA + SIZE - P, 2 * P) == (GPA + SIZE, P)
            with raises_kvm(errno.ENOENT, OP):
                vcpu.pre_fault_memory(GPA + SIZE, P)
        finally:
            vm.set_user_memory_region2(10, GPA, 0)


def test_pre_fault_memory_private_without_gmem_efault(system: kvmgmem.System, protected_vm: kvmgmem.Vm,
                                                      backend: str) -> None:  # fmt: skip
    """A PRIVATE gpa in a memslot without a guest_memfd cannot be faulted in: `kvm_mmu_faultin_pfn_gmem`
    prepares a memory-fault exit and the ioctl fails with EFAULT (no page mapped, range unchanged)."""
    require_cap(system, uapi.KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY", backend)
    vm = protected_vm
    with HostMemory(SIZE) as mem, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region(10, GPA, SIZE, mem)
        try:
            vm.set_memory_attributes(GPA, P, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            with raises_kvm(errno.EFAULT, OP):
                vcpu.pre_fault_memory(GPA, P)
        finally:
            vm.set_user_memory_region(10, GPA, 0)


def test_pre_fault_memory_eintr_after_kick(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """A kick (immediate_exit plus a signal) before the call: `signal_pending` is checked before the first page,
    so the ioctl fails with EINTR and maps nothing; the signal is then delivered, and the next call maps the
    range."""
    require_cap(system, uapi.KVM_CAP_PRE_FAULT_MEMORY, "KVM_CAP_PRE_FAULT_MEMORY", backend)
    if backend == "kvm":
        pytest.skip("a kick signals only a thread inside KVM_RUN on the kvm backend; no pending signal to test")
    with HostMemory(SIZE) as mem, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region(0, GPA, SIZE, mem)
        try:
            vcpu.kick()
            with raises_kvm(errno.EINTR, OP):
                vcpu.pre_fault_memory(GPA, P)
            assert vcpu.pre_fault_memory(GPA, P) == (GPA + P, 0)
        finally:
            vm.set_user_memory_region(0, GPA, 0)
