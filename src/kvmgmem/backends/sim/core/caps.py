"""KVM_CHECK_EXTENSION answers (`kvm_vm_ioctl_check_extension_generic`, include/uapi/linux/kvm.h), for the system fd
(``vm is None``) or a VM.

Why one function: the table differs by profile and by VM type in a handful of places; keeping every answer
here makes the "default profile matches the host" claim checkable line by line against this host's answers
(``kvmgmem caps``; tests/differential checks ``profile="host"`` against the kvm backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmgmem import uapi

from .profile import Profile

if TYPE_CHECKING:
    from .vm import VmCore

KVM_CAP_MAX_VCPU_ID = 128


def check_extension(profile: Profile, cap: int, vm: VmCore | None = None) -> int:
    """The value KVM_CHECK_EXTENSION returns; unknown caps → 0."""
    private = vm.has_private_mem if vm is not None else None
    if cap in (uapi.KVM_CAP_USER_MEMORY, uapi.KVM_CAP_IRQCHIP, uapi.KVM_CAP_GET_TSC_KHZ):
        return 1
    if cap == uapi.KVM_CAP_NR_VCPUS:
        return profile.nr_vcpus
    if cap == uapi.KVM_CAP_MAX_VCPUS:
        return profile.max_vcpus
    if cap == KVM_CAP_MAX_VCPU_ID:
        return profile.max_vcpu_id
    if cap == uapi.KVM_CAP_NR_MEMSLOTS:
        return profile.nr_memslots
    if cap in (uapi.KVM_CAP_READONLY_MEM, uapi.KVM_CAP_CHECK_EXTENSION_VM, uapi.KVM_CAP_IMMEDIATE_EXIT):
        return 1
    if cap == uapi.KVM_CAP_MULTI_ADDRESS_SPACE:
        # kvm_vm_ioctl_check_extension_generic only has this case when KVM_MAX_NR_ADDRESS_SPACES > 1 (SMM
        # compiled in); without SMM the cap is unknown, i.e. 0, on the system fd and on every VM.
        if profile.address_spaces == 1:
            return 0
        return 1 if private else profile.address_spaces
    if cap == uapi.KVM_CAP_EXIT_HYPERCALL:
        return 1 << uapi.KVM_HC_MAP_GPA_RANGE
    if cap in (uapi.KVM_CAP_USER_MEMORY2, uapi.KVM_CAP_MEMORY_FAULT_INFO):
        return 1
    if cap == uapi.KVM_CAP_MEMORY_ATTRIBUTES:
        return supported_attributes(profile, vm)
    if cap == uapi.KVM_CAP_GUEST_MEMFD:
        return 1 if profile.gmem_cap_everywhere or vm is None or private else 0
    if cap == uapi.KVM_CAP_VM_TYPES:
        return profile.vm_types_mask
    if cap == uapi.KVM_CAP_GUEST_MEMFD_FLAGS:
        return profile.gmem_valid_flags(private)
    if cap == uapi.KVM_CAP_DISABLE_QUIRKS:  # x86 kvm_vm_ioctl_check_extension: a plain 1
        return 1
    if cap == uapi.KVM_CAP_DISABLE_QUIRKS2:
        return profile.supported_quirks
    if cap == uapi.KVM_CAP_PRE_FAULT_MEMORY:
        return int(profile.pre_fault_memory and profile.tdp)  # x86: r = tdp_enabled
    return 0


def supported_attributes(profile: Profile, vm: VmCore | None) -> int:
    """KVM_MEMORY_ATTRIBUTE_PRIVATE for the system and private-memory VMs, when compiled in."""
    if not profile.sw_protected:
        return 0
    if vm is None or vm.has_private_mem:
        return uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    return 0
