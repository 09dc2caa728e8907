"""Capability answers (`kvm_vm_ioctl_check_extension_generic`, profile 6.18 — this host's kernel), VM types
(`kvm_dev_ioctl_create_vm`) and KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) (x86 `kvm_vm_ioctl_enable_cap`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kvmgmem
from kvmgmem import uapi

from ._util import EEXIST, EINVAL, INIT_SHARED, MMAP, P, raises_kvm

PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
HC_BIT = 1 << uapi.KVM_HC_MAP_GPA_RANGE

#: `kvm_vm_ioctl_check_extension_generic` as of 6.18: caps every x86 6.18 KVM with guest_memfd answers the same on
#: /dev/kvm and a DEFAULT VM.
COMMON = {
    uapi.KVM_CAP_USER_MEMORY: 1,
    uapi.KVM_CAP_NR_MEMSLOTS: 32764,
    uapi.KVM_CAP_CHECK_EXTENSION_VM: 1,
    uapi.KVM_CAP_EXIT_HYPERCALL: HC_BIT,
    uapi.KVM_CAP_USER_MEMORY2: 1,
    uapi.KVM_CAP_MEMORY_FAULT_INFO: 1,
    uapi.KVM_CAP_GUEST_MEMFD: 1,
    uapi.KVM_CAP_GUEST_MEMFD_FLAGS: MMAP | INIT_SHARED,
}
NAMES = {v: k for k, v in uapi.CAPS.items()}


def _answers(obj: object, caps: dict[int, int]) -> dict[str, int]:
    return {NAMES[c]: obj.check_extension(c) for c in caps}  # type: ignore[attr-defined]


def test_caps_system_6_18(system: kvmgmem.System) -> None:
    """`kvm_vm_ioctl_check_extension_generic` on /dev/kvm: USER_MEMORY2 1, MEMORY_FAULT_INFO 1, GUEST_MEMFD 1,
    GUEST_MEMFD_FLAGS MMAP|INIT_SHARED = 3, EXIT_HYPERCALL 1<<12, NR_MEMSLOTS 32764, USER_MEMORY 1, CHECK_EXTENSION_VM
    1."""
    assert _answers(system, COMMON) == {NAMES[c]: v for c, v in COMMON.items()}


def test_caps_default_vm_6_18(vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_check_extension_generic` on a DEFAULT VM (6.18): the same answers as the system — GUEST_MEMFD 1 for
    every VM, GUEST_MEMFD_FLAGS 3 (INIT_SHARED allowed: no private memory) — and MEMORY_ATTRIBUTES 0."""
    expected = {**COMMON, uapi.KVM_CAP_MEMORY_ATTRIBUTES: 0}
    assert _answers(vm, expected) == {NAMES[c]: v for c, v in expected.items()}


def test_caps_sw_protected_vm_6_18(protected_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_check_extension_generic` on a SW_PROTECTED VM: GUEST_MEMFD 1, GUEST_MEMFD_FLAGS MMAP only (1),
    MEMORY_ATTRIBUTES PRIVATE (8), USER_MEMORY2 1; a private-memory VM has a single address space (MULTI_ADDRESS_SPACE ≤
    1)."""
    expected = {
        **COMMON,
        uapi.KVM_CAP_GUEST_MEMFD_FLAGS: MMAP,
        uapi.KVM_CAP_MEMORY_ATTRIBUTES: PRIVATE,
    }
    assert _answers(protected_vm, expected) == {NAMES[c]: v for c, v in expected.items()}
    assert protected_vm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) <= 1


def test_caps_memory_attributes_consistent(system: kvmgmem.System) -> None:
    """`kvm_vm_ioctl_check_extension_generic`: system MEMORY_ATTRIBUTES is 0 (not
    configured, as on this host) or PRIVATE; a kernel that offers SW_PROTECTED VMs must offer PRIVATE."""
    cap = system.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    assert cap in (0, PRIVATE)
    if uapi.KVM_X86_SW_PROTECTED_VM in system.supported_vm_types:
        assert cap == PRIVATE


def test_caps_unknown_cap_is_zero(system: kvmgmem.System, vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_check_extension_generic`: unknown caps return 0 (243 is an arm64 cap; 9999 and 1<<20 do not
    exist)."""
    for cap in (243, 9999, 1 << 20):
        assert system.check_extension(cap) == 0
        assert vm.check_extension(cap) == 0


def test_supported_vm_types(system: kvmgmem.System) -> None:
    """`kvm_vm_ioctl_check_extension_generic` VM_TYPES / `kvm_dev_ioctl_create_vm`: supported_vm_types is the bit set of
    KVM_CAP_VM_TYPES (DEFAULT always in it); each listed type can be created, and reports its type."""
    mask = system.check_extension(uapi.KVM_CAP_VM_TYPES)
    types = system.supported_vm_types
    assert uapi.KVM_X86_DEFAULT_VM in types
    if mask:
        assert types == frozenset(t for t in range(32) if mask >> t & 1)
    for t in sorted(types):
        with system.create_vm(t) as v:
            assert v.vm_type == t
            assert v.has_private_mem == (t in uapi.PRIVATE_MEM_VM_TYPES)


def test_create_vm_unsupported_type_einval(system: kvmgmem.System) -> None:
    """`kvm_dev_ioctl_create_vm`: a type ≥ 32 or whose bit is not in the supported bitmap → EINVAL (KVM_CREATE_VM)."""
    types = system.supported_vm_types
    missing = [t for t in range(6) if t not in types]
    for t in [*missing, 31, 32, 0xFFFFFFFF]:
        with raises_kvm(EINVAL, "KVM_CREATE_VM"):
            system.create_vm(t)


def test_multi_address_space_consistent(vm: kvmgmem.Vm) -> None:
    """`kvm_arch_nr_memslot_as_ids`/`__kvm_set_memory_region`: memslot as_id (slot >> 16) must be <
    KVM_CAP_MULTI_ADDRESS_SPACE (0 means 1 space): the first address space past the count → EINVAL; the ones below it
    work."""
    n = max(vm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE), 1)
    with raises_kvm(EINVAL, "KVM_SET_USER_MEMORY_REGION"):
        vm.set_user_memory_region(n << 16, 0, P, None)
    for as_id in range(n):
        vm.set_user_memory_region(as_id << 16, 0, P, None)
        vm.set_user_memory_region(as_id << 16, 0, 0, None)


# --- x86 `kvm_vm_ioctl_enable_cap` KVM_ENABLE_CAP(EXIT_HYPERCALL) ---------------------------------------------


@pytest.mark.parametrize(
    "vm_type",
    [
        pytest.param(uapi.KVM_X86_DEFAULT_VM, id="DEFAULT"),
        pytest.param(uapi.KVM_X86_SW_PROTECTED_VM, id="SW_PROTECTED"),
    ],
)
def test_enable_cap_exit_hypercall(vm_of: Callable[[int], kvmgmem.Vm], vm_type: int) -> None:
    """x86 `kvm_vm_ioctl_enable_cap` (also measured on this host): args[0] = 1<<12 → ok (also repeated, and 0 to
    clear); args[0] with any other bit (1<<11, 0xffffffff, 1<<12|1) → EINVAL; flags != 0 → EINVAL even with a valid
    mask."""
    vm = vm_of(vm_type)
    op = "KVM_ENABLE_CAP"
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0)
    for mask in (1 << 11, 0xFFFFFFFF, HC_BIT | 1, 1 << 63):
        with raises_kvm(EINVAL, op):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, mask)
    for flags in (1, 1 << 31):
        with raises_kvm(EINVAL, op):
            vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT, flags=flags)
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)


def test_enable_cap_exit_hypercall_after_vcpu(vm: kvmgmem.Vm) -> None:
    """Enabling EXIT_HYPERCALL works after KVM_CREATE_VCPU too (x86 `kvm_vm_ioctl_enable_cap` does not check
    ``kvm->created_vcpus`` for it; so on this host)."""
    vm.create_vcpu(0)
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, HC_BIT)


def test_create_vcpu_duplicate_id_eexist(vm: kvmgmem.Vm) -> None:
    """kvm_vm_ioctl_create_vcpu: a vCPU id the VM already has → EEXIST, also after the first vCPU's fd was
    closed (the kernel's vCPU lives until the VM is destroyed, so its id stays taken); other ids still work."""
    first = vm.create_vcpu(0)
    with raises_kvm(EEXIST, "KVM_CREATE_VCPU"):
        vm.create_vcpu(0)
    first.close()
    with raises_kvm(EEXIST, "KVM_CREATE_VCPU"):
        vm.create_vcpu(0)
    assert vm.create_vcpu(1).vcpu_id == 1


def test_enable_cap_bad_arguments(vm: kvmgmem.Vm) -> None:
    """API argument rule: more than 4 args, or a too-wide arg → ValueError naming KVM_ENABLE_CAP."""
    with pytest.raises(ValueError, match="KVM_ENABLE_CAP"):
        vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="KVM_ENABLE_CAP"):
        vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << 64)
