"""KVM_CREATE_VCPU's admission in the core (``VmCore.create_vcpu``, as ``kvm_vm_ioctl_create_vcpu``): the id
limit, the vCPU count limit and EEXIST for an id already used, on plain objects (no vCPU is built)."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import create_vm, get_profile
from kvmgmem.backends.sim.core.caps import KVM_CAP_MAX_VCPU_ID
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.errors import KvmError


def small_vm(max_vcpus: int = 3, max_vcpu_id: int = 8) -> VmCore:
    profile = dataclasses.replace(get_profile("6.18"), max_vcpus=max_vcpus, max_vcpu_id=max_vcpu_id)
    return create_vm(profile, uapi.KVM_X86_DEFAULT_VM)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    assert info.value.op == "KVM_CREATE_VCPU"
    return info.value.errno


def test_defaults_match_the_caps() -> None:
    vm = create_vm(get_profile("6.18"), uapi.KVM_X86_DEFAULT_VM)
    assert vm.check_extension(KVM_CAP_MAX_VCPU_ID) == vm.profile.max_vcpu_id
    assert vm.check_extension(uapi.KVM_CAP_MAX_VCPUS) == vm.profile.max_vcpus
    vm.create_vcpu(vm.profile.max_vcpu_id - 1)
    assert errno_of(lambda: vm.create_vcpu(vm.profile.max_vcpu_id)) == errno.EINVAL


def test_id_limit() -> None:
    vm = small_vm()
    for vcpu_id in (8, 9, (1 << 32) - 1):
        assert errno_of(lambda i=vcpu_id: vm.create_vcpu(i)) == errno.EINVAL
    vm.create_vcpu(7)
    assert vm.vcpu_ids == {7}


def test_count_limit_then_id_limit_first() -> None:
    vm = small_vm()
    for vcpu_id in (0, 5, 2):
        vm.create_vcpu(vcpu_id)
    assert errno_of(lambda: vm.create_vcpu(1)) == errno.EINVAL  # KVM_CAP_MAX_VCPUS reached
    assert errno_of(lambda: vm.create_vcpu(5)) == errno.EINVAL  # the count is checked before the duplicate
    assert errno_of(lambda: vm.create_vcpu(99)) == errno.EINVAL
    assert vm.vcpu_ids == {0, 2, 5}


def test_duplicate_id_eexist_and_a_failed_creation_frees_its_id() -> None:
    vm = small_vm()
    vm.create_vcpu(0)
    assert errno_of(lambda: vm.create_vcpu(0)) == errno.EEXIST
    vm.create_vcpu(1)
    vm.create_vcpu_failed(1)  # the adapter could not build vCPU 1
    vm.create_vcpu(1)
    vm.create_vcpu(2)
    assert vm.vcpu_ids == {0, 1, 2}
