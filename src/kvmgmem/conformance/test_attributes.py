"""KVM_SET_MEMORY_ATTRIBUTES conformance: `kvm_vm_ioctl_set_mem_attributes` (check order, no memslot needed),
`kvm_vm_ioctl_check_extension_generic` (which VMs support which attributes).

This host's real 6.18 kernel is built without generic memory attributes (KVM_CAP_MEMORY_ATTRIBUTES = 0,
docs/conformance.md), so the ioctl does not exist there → ENOTTY. Backends that have the ioctl (the sim) are checked
against `kvm_vm_ioctl_set_mem_attributes` on the VM types that support PRIVATE (SW_PROTECTED) and on the DEFAULT VM
(supports nothing).
"""

from __future__ import annotations

import errno

import pytest

import kvmgmem
from kvmgmem import uapi

from ._util import EINVAL, GMEM, MEM_REGION_GPA, MEM_REGION_SIZE, MEM_REGION_SLOT, P, raises_kvm, require_cap

OP = "KVM_SET_MEMORY_ATTRIBUTES"
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE


def test_attributes_enotty_without_cap(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """`kvm_vm_ioctl_set_mem_attributes` preamble: a kernel without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES (system
    KVM_CAP_MEMORY_ATTRIBUTES = 0) has no such ioctl: every call → ENOTTY, whatever the arguments. The sim's default
    build has the attributes, so on the sim the case runs on ``profile="host"``, which is built without them."""
    if backend == "sim" and system.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES):
        with kvmgmem.open("sim", profile="host") as host_sim, host_sim.create_vm() as host_vm:
            _check_enotty(host_sim, host_vm)
        return
    cap = system.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES)
    if cap:
        pytest.skip(f"backend {backend} has KVM_CAP_MEMORY_ATTRIBUTES = {cap:#x}; the ENOTTY case needs it absent")
    _check_enotty(system, vm)


def _check_enotty(system: kvmgmem.System, vm: kvmgmem.Vm) -> None:
    assert system.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    for address, size, attributes, flags in ((0, P, 0, 0), (0, P, PRIVATE, 0), (1, 0, 0xFF, 1)):
        with raises_kvm(errno.ENOTTY, OP):
            vm.set_memory_attributes(address, size, attributes, flags)


def test_attributes_default_vm_supports_none(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """`kvm_vm_ioctl_check_extension_generic`/`kvm_vm_ioctl_set_mem_attributes`: where the ioctl exists, a DEFAULT VM
    reports MEMORY_ATTRIBUTES 0 and accepts only attributes == 0; PRIVATE → EINVAL."""
    require_cap(system, uapi.KVM_CAP_MEMORY_ATTRIBUTES, "KVM_CAP_MEMORY_ATTRIBUTES", backend)
    assert vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    with raises_kvm(EINVAL, OP):
        vm.set_memory_attributes(MEM_REGION_GPA, P, PRIVATE)
    vm.set_memory_attributes(MEM_REGION_GPA, P, 0)


@pytest.fixture
def attr_vm(protected_vm: kvmgmem.Vm, backend: str) -> kvmgmem.Vm:
    """A VM whose MEMORY_ATTRIBUTES includes PRIVATE (SW_PROTECTED), or skip naming the capability."""
    require_cap(protected_vm, uapi.KVM_CAP_MEMORY_ATTRIBUTES, "KVM_CAP_MEMORY_ATTRIBUTES", backend, mask=PRIVATE)
    return protected_vm


def test_attributes_private_vm_cap(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_check_extension_generic`: a SW_PROTECTED VM reports exactly KVM_MEMORY_ATTRIBUTE_PRIVATE (8)."""
    assert attr_vm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == PRIVATE


def test_attributes_flags_nonzero_einval(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: flags != 0 → EINVAL, even when everything else is valid."""
    for flags in (1, 8, 1 << 63):
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes(MEM_REGION_GPA, P, PRIVATE, flags)


def test_attributes_unsupported_bits_einval(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: any attribute bit other than PRIVATE (RWX bits 0–2 are reserved, bit 4, bit
    63) → EINVAL, alone or next to PRIVATE."""
    for attrs in (1, 2, 4, 0x10, 1 << 63, PRIVATE | 1, PRIVATE | 0x10):
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes(MEM_REGION_GPA, P, attrs)


def test_attributes_size_zero_or_wrap_einval(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: size 0 → EINVAL; address + size wrapping u64 → EINVAL — including the last
    page, whose end 2^64 wraps to 0 (the kernel tests ``address + size < address``)."""
    for attrs in (0, PRIVATE):
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes(MEM_REGION_GPA, 0, attrs)
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes((1 << 64) - P, 2 * P, attrs)
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes((1 << 64) - P, P, attrs)


def test_attributes_unaligned_einval(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: address or size not page aligned → EINVAL."""
    for address, size in ((MEM_REGION_GPA + 0x800, P), (MEM_REGION_GPA, P + 1), (1, P), (0, P - 1)):
        with raises_kvm(EINVAL, OP):
            attr_vm.set_memory_attributes(address, size, PRIVATE)


def test_attributes_no_memslot_required(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: any aligned range is accepted without a memslot; setting the same value again
    is a no-op success; 0 converts back; a huge range (1 TiB) too."""
    attr_vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, PRIVATE)
    attr_vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, PRIVATE)
    attr_vm.set_memory_attributes(MEM_REGION_GPA + P, P, 0)
    attr_vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, 0)
    attr_vm.set_memory_attributes(0, 1 << 40, PRIVATE)
    attr_vm.set_memory_attributes(0, 1 << 40, 0)
    attr_vm.set_memory_attributes((1 << 64) - 2 * P, P, PRIVATE)  # next-to-last page: address + size < 2^64


def test_attributes_over_gmem_slot(attr_vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: converting a range covered by a GUEST_MEMFD memslot (partly, and past its end)
    succeeds."""
    with attr_vm.create_guest_memfd(MEM_REGION_SIZE, 0) as g:
        attr_vm.set_user_memory_region2(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, None, GMEM, g, 0)
        attr_vm.set_memory_attributes(MEM_REGION_GPA, P, PRIVATE)
        attr_vm.set_memory_attributes(MEM_REGION_GPA + MEM_REGION_SIZE - P, 2 * P, PRIVATE)
        attr_vm.set_memory_attributes(MEM_REGION_GPA, MEM_REGION_SIZE, 0)
        attr_vm.set_user_memory_region2(MEM_REGION_SLOT, 0, 0, None, GMEM, None, 0)


def test_attributes_bad_argument_types(vm: kvmgmem.Vm) -> None:
    """API argument rule: wrong types / too-wide values are refused before any ioctl, naming the op."""
    with pytest.raises(TypeError, match=OP):
        vm.set_memory_attributes("0", P, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=OP):
        vm.set_memory_attributes(0, 1 << 64, 0)
