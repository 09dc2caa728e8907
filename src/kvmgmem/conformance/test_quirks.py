"""x86 quirks: KVM_CHECK_EXTENSION(KVM_CAP_DISABLE_QUIRKS2) answers ``kvm_caps.supported_quirks`` and
KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS / KVM_CAP_DISABLE_QUIRKS2) on a VM follows x86 ``kvm_vm_ioctl_enable_cap``
(Documentation/virt/kvm/api.rst). What disabling KVM_X86_QUIRK_SLOT_ZAP_ALL does to the SPTEs is
not visible through the API; the sim's own tests check it in its introspection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import kvmgmem
from kvmgmem import uapi

from ._util import EINVAL, raises_kvm, require_cap

Q1, Q2 = uapi.KVM_CAP_DISABLE_QUIRKS, uapi.KVM_CAP_DISABLE_QUIRKS2
ZAP_ALL = uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL
#: Quirks every kernel since 6.12 supports whatever its paging mode (IGNORE_GUEST_PAT needs TDP): bits 0–8.
SINCE_6_12 = (1 << 9) - 1
ALL_ONES = (1 << 64) - 1
VM_TYPES = [
    pytest.param(uapi.KVM_X86_DEFAULT_VM, id="DEFAULT"),
    pytest.param(uapi.KVM_X86_SW_PROTECTED_VM, id="SW_PROTECTED"),
]


def test_disable_quirks_caps(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """DISABLE_QUIRKS answers 1 and DISABLE_QUIRKS2 the supported quirks, the same on /dev/kvm and a VM; a 6.12+
    kernel (this host, the sim's 6.18 and 7.2) supports at least bits 0–8, SLOT_ZAP_ALL among them."""
    supported = require_cap(system, Q2, "KVM_CAP_DISABLE_QUIRKS2", backend, ZAP_ALL)
    assert vm.check_extension(Q2) == supported
    assert supported & SINCE_6_12 == SINCE_6_12
    assert system.check_extension(Q1) == vm.check_extension(Q1) == 1


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_disable_quirks2_accepts_supported_bits_only(
    system: kvmgmem.System, vm_of: Callable[[int], kvmgmem.Vm], backend: str, vm_type: int
) -> None:
    """``kvm_vm_ioctl_enable_cap``: DISABLE_QUIRKS2 with any subset of the supported quirks → 0 (also repeated,
    and 0); a bit outside them (the lowest and the highest) → EINVAL; flags != 0 → EINVAL."""
    supported = require_cap(system, Q2, "KVM_CAP_DISABLE_QUIRKS2", backend, ZAP_ALL)
    vm = vm_of(vm_type)
    op = "KVM_ENABLE_CAP"
    unsupported = ALL_ONES & ~supported
    for mask in (unsupported & -unsupported, 1 << 63, supported | 1 << 63):
        with raises_kvm(EINVAL, op):
            vm.enable_cap(Q2, mask)
    with raises_kvm(EINVAL, op):
        vm.enable_cap(Q2, ZAP_ALL, flags=1)
    vm.enable_cap(Q2, ZAP_ALL)
    vm.enable_cap(Q2, ZAP_ALL)
    vm.enable_cap(Q2, 0)
    vm.enable_cap(Q2, supported)


@pytest.mark.parametrize("vm_type", VM_TYPES)
def test_disable_quirks_ignores_unsupported_bits(
    system: kvmgmem.System, vm_of: Callable[[int], kvmgmem.Vm], backend: str, vm_type: int
) -> None:
    """KVM_CAP_DISABLE_QUIRKS (the first version) checks no bit: all 64 set → 0; flags != 0 → EINVAL."""
    require_cap(system, Q1, "KVM_CAP_DISABLE_QUIRKS", backend)
    vm = vm_of(vm_type)
    vm.enable_cap(Q1, ALL_ONES)
    with raises_kvm(EINVAL, "KVM_ENABLE_CAP"):
        vm.enable_cap(Q1, ZAP_ALL, flags=1)


def test_disable_quirks_after_vcpu(system: kvmgmem.System, vm: kvmgmem.Vm, backend: str) -> None:
    """Quirks can still be disabled once vCPUs exist (``kvm_vm_ioctl_enable_cap`` does not look at
    ``kvm->created_vcpus`` for them)."""
    require_cap(system, Q2, "KVM_CAP_DISABLE_QUIRKS2", backend, ZAP_ALL)
    vm.create_vcpu(0)
    vm.enable_cap(Q2, ZAP_ALL)
