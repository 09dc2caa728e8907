"""``kvmgmem.open`` options: the same rules on every backend, checked before anything is opened.

An option that is silently dropped runs the caller against a configuration it did not ask for, and a bad
value that gets as far as a VM ends as an exception nobody can catch (a finalizer's IndexError). So: unknown
names are a TypeError everywhere, sim-only options on ``kvm`` and kvm-only options on ``sim``/``auto`` are a
ValueError, sim-only options make ``auto`` pick the sim, and bad values are a ValueError at open.
None of these need ``/dev/kvm``: the checks run before the device is opened.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

import kvmgmem
from kvmgmem import uapi


@pytest.mark.parametrize("backend", ["auto", "kvm", "sim"])
def test_unknown_option_is_a_type_error_on_every_backend(backend: str) -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) bogus"):
        kvmgmem.open(backend, bogus=1)


@pytest.mark.parametrize("option", [{"sw_protected": False}, {"profile": "host"}, {"hugepage": True}])
def test_sim_only_option_on_kvm_is_refused(option: dict[str, Any]) -> None:
    (name,) = option
    with pytest.raises(ValueError, match=rf"{name} configure\(s\) the sim; backend 'kvm'"):
        kvmgmem.open("kvm", **option)


@pytest.mark.parametrize("backend", ["auto", "sim"])
def test_kvm_only_option_elsewhere_is_refused(backend: str) -> None:
    with pytest.raises(ValueError, match="path is a kvm backend option"):
        kvmgmem.open(backend, path="/dev/kvm")


def test_auto_with_sim_only_options_picks_the_sim() -> None:
    """Only the sim can honour ``hugepage``: auto must not open /dev/kvm and drop it."""
    with kvmgmem.open("auto", hugepage=True) as system:
        assert system.backend == "sim"
        assert "sim-only option(s) hugepage" in system.selection_reason
        assert system.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & (1 << 63)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "options",
    [
        {"address_spaces": 0},
        {"address_spaces": 3},
        {"nr_memslots": 0},
        {"nr_memslots": 1 << 20},
        {"max_gpa_bits": 64},
        {"max_mapping_level": 0},
        {"host_mapping_level": 4},
        {"user_addr_limit": 0x1234},
        {"nr_vcpus": 0},
        {"max_vcpu_id": -1},
        {"hugepage": "yes"},
        {"sw_protected": 0},
        {"address_spaces": True},
        {"bind_overlap_errno": 0},
        {"private_access_bit": 7},
        {"profile": "9.9"},
    ],
    ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()),
)
@pytest.mark.parametrize("backend", ["sim", "auto"])
def test_invalid_values_are_a_value_error_at_open(backend: str, options: dict[str, Any]) -> None:
    """ValueError naming the option, raised by open itself; nothing half-built is left for a finalizer."""
    (name,) = options
    with pytest.raises(ValueError, match=name if name != "profile" else "unknown sim profile"):
        kvmgmem.open(backend, **options)
    gc.collect()


def test_bad_vm_type_is_a_value_error() -> None:
    for bad in ("1", -1, True):
        with pytest.raises(ValueError, match="vm_type"):
            kvmgmem.open("auto", vm_type=bad)  # type: ignore[arg-type]


def test_host_profile_is_6_18_without_sw_protected_and_smm() -> None:
    """``profile="host"``: the 6.18 rules with VM_TYPES 1, MEMORY_ATTRIBUTES 0 and no multi-address-space
    cap (a kernel without SMM compiles KVM_CAP_MULTI_ADDRESS_SPACE out); ``tests/differential`` compares it
    with the real host."""
    with kvmgmem.open("sim", profile="host") as system, system.create_vm() as vm:
        assert system.supported_vm_types == {uapi.KVM_X86_DEFAULT_VM}
        for obj in (system, vm):
            assert obj.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
            assert obj.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 0
            assert obj.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) == 3
        with pytest.raises(kvmgmem.KvmError) as info:
            vm.set_user_memory_region(1 << 16, 0, uapi.PAGE_SIZE, None)
        assert info.value.errno == 22
