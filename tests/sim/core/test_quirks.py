"""x86 quirks in the core: KVM_CAP_DISABLE_QUIRKS2's answer per profile (``kvm_caps.supported_quirks``),
KVM_ENABLE_CAP(DISABLE_QUIRKS/DISABLE_QUIRKS2) as x86 ``kvm_vm_ioctl_enable_cap`` of each version, and
KVM_X86_QUIRK_SLOT_ZAP_ALL's choice in ``kvm_arch_flush_shadow_memslot``: deleting or moving a memslot zaps every
SPTE (``kvm_mmu_zap_all_fast``) or only the slot's (``kvm_mmu_zap_memslot``), seen in the SPTE introspection."""

from __future__ import annotations

import errno
from collections.abc import Iterator

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import create_vm, get_profile
from kvmgmem.backends.sim.core.quirks import NOT_MODELLED
from kvmgmem.backends.sim.core.vm import VmCore
from kvmgmem.backends.sim.fault import Mapped
from kvmgmem.errors import KvmError

P = uapi.PAGE_SIZE
ZAP_ALL = uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL
PAT = uapi.KVM_X86_QUIRK_IGNORE_GUEST_PAT
Q1, Q2 = uapi.KVM_CAP_DISABLE_QUIRKS, uapi.KVM_CAP_DISABLE_QUIRKS2
HVA = 0x7F0000000000
#: Two memslots of 4 pages each: slot 1 at 1 GiB, slot 2 at 2 GiB.
GPA = {1: 1 << 30, 2: 1 << 31}


@pytest.fixture
def vms() -> Iterator[list[VmCore]]:
    made: list[VmCore] = []
    yield made
    for v in made:
        v.put()


def _vm(made: list[VmCore], profile: str = "6.18", vm_type: int = uapi.KVM_X86_DEFAULT_VM, **opts: object) -> VmCore:
    v = create_vm(get_profile(profile, **opts), vm_type)
    made.append(v)
    return v


def _disable(vm: VmCore, cap: int, mask: int) -> None:
    vm.enable_cap(cap, 0, (mask, 0, 0, 0))


def _region(vm: VmCore, slot: int, gpa: int, size: int = 4 * P) -> None:
    hva = HVA + (slot & 0xFFFF) * (1 << 30)
    vm.set_user_memory_region(
        v2=True, slot=slot, flags=0, guest_phys_addr=gpa, memory_size=size, userspace_addr=hva,
        hva_live=(hva, hva + 4 * P),
    )  # fmt: skip


def _two_mapped_slots(vm: VmCore) -> None:
    """Slots 1 and 2, every page of both mapped."""
    for slot, gpa in GPA.items():
        _region(vm, slot, gpa)
        for i in range(4):
            assert isinstance(vm.handle_fault(gpa + i * P), Mapped)
    assert _mapped_slots(vm) == {1, 2}


def _mapped_slots(vm: VmCore) -> set[int]:
    return {s["slot"] for s in vm.introspect()["sptes"]}


# --- KVM_CHECK_EXTENSION(KVM_CAP_DISABLE_QUIRKS2) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "opts", "expected"),
    [
        pytest.param("6.8", {}, 0x7F, id="6.8"),  # bits 0-6: no SLOT_ZAP_ALL before 6.12
        pytest.param("6.18", {}, 0x7FF, id="6.18"),  # + ZAP_ALL, FEATURE_MSRS, GUEST_PAT, FREEZE_IN_SMM
        pytest.param("6.18", {"tdp": False}, 0x5FF, id="6.18-shadow"),  # shadow paging: no IGNORE_GUEST_PAT
        pytest.param("host", {}, 1535, id="host"),  # as this host answers
        pytest.param("7.2", {}, 0xFFF, id="7.2"),  # + NESTED_SVM_SHARED_PAT
    ],
)
def test_disable_quirks2_answers_the_supported_quirks(
    vms: list[VmCore], profile: str, opts: dict[str, object], expected: int
) -> None:
    """x86 ``kvm_vm_ioctl_check_extension``: DISABLE_QUIRKS2 = ``kvm_caps.supported_quirks`` (the version's
    KVM_X86_VALID_QUIRKS, less IGNORE_GUEST_PAT without TDP), the same on every VM type; DISABLE_QUIRKS = 1."""
    vm = _vm(vms, profile, **opts)
    assert vm.check_extension(Q2) == expected == vm.profile.supported_quirks
    assert vm.check_extension(Q1) == 1


def test_every_quirk_but_slot_zap_all_is_documented_as_not_modelled() -> None:
    """Each quirk the sim reports but does not model says what disabling it would change."""
    assert set(NOT_MODELLED) | {ZAP_ALL} == {1 << b for b in range(12)}
    assert ZAP_ALL not in NOT_MODELLED and all(NOT_MODELLED.values())


# --- KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS/DISABLE_QUIRKS2) ---------------------------------------------------


def test_disable_quirks2_refuses_unsupported_bits(vms: list[VmCore]) -> None:
    """``kvm_vm_ioctl_enable_cap``: DISABLE_QUIRKS2 with a bit outside ``supported_quirks`` → EINVAL and nothing
    changes (also IGNORE_GUEST_PAT without TDP, and SLOT_ZAP_ALL on 6.8); flags → EINVAL."""
    for profile, opts, bad in (("6.18", {}, 1 << 11), ("6.18", {"tdp": False}, PAT), ("6.8", {}, ZAP_ALL)):
        vm = _vm(vms, profile, **opts)
        for mask in (bad, bad | 1, 1 << 63):
            with pytest.raises(KvmError) as e:
                _disable(vm, Q2, mask)
            assert e.value.errno == errno.EINVAL and e.value.op == "KVM_ENABLE_CAP"
        with pytest.raises(KvmError) as e:
            vm.enable_cap(Q2, 1, (1, 0, 0, 0))
        assert e.value.errno == errno.EINVAL
        assert vm.disabled_quirks == 0


def test_quirks_stay_disabled_since_6_16(vms: list[VmCore]) -> None:
    """6.16+: both caps OR the supported bits of args[0] into ``disabled_quirks`` — DISABLE_QUIRKS drops the
    others silently, and neither can re-enable a quirk."""
    vm = _vm(vms, "6.18")
    _disable(vm, Q2, ZAP_ALL)
    _disable(vm, Q2, 0)
    _disable(vm, Q1, 0)
    assert vm.disabled_quirks == ZAP_ALL
    _disable(vm, Q1, (1 << 64) - 1)
    assert vm.disabled_quirks == vm.profile.supported_quirks == 0x7FF
    assert vm.introspect()["disabled_quirks"] == 0x7FF


def test_quirks_are_assigned_on_6_8(vms: list[VmCore]) -> None:
    """6.8: args[0] replaces ``disabled_quirks`` (DISABLE_QUIRKS unchecked), so a later call re-enables."""
    vm = _vm(vms, "6.8")
    _disable(vm, Q1, 1 << 40)
    assert vm.disabled_quirks == 1 << 40
    _disable(vm, Q2, 0x7F)
    assert vm.disabled_quirks == 0x7F
    _disable(vm, Q2, 0)
    assert vm.disabled_quirks == 0


def test_disable_quirks_after_vcpus_exist(vms: list[VmCore]) -> None:
    """``kvm_vm_ioctl_enable_cap`` does not check ``created_vcpus`` for the quirk caps."""
    vm = _vm(vms)
    vm.create_vcpu(0)
    _disable(vm, Q2, ZAP_ALL)
    assert vm.disabled_quirks == ZAP_ALL


# --- KVM_X86_QUIRK_SLOT_ZAP_ALL in kvm_arch_flush_shadow_memslot ----------------------------------------------


@pytest.mark.parametrize("change", ["delete", "move"])
def test_slot_zap_all_quirk_zaps_every_slot(vms: list[VmCore], change: str) -> None:
    """A DEFAULT VM with the quirk (the default): deleting or moving slot 1 zaps slot 2's SPTEs too
    (``kvm_mmu_zap_all_fast``); slot 2 faults back in."""
    vm = _vm(vms)
    _two_mapped_slots(vm)
    _region(vm, 1, GPA[1], 0) if change == "delete" else _region(vm, 1, 3 << 30)
    assert _mapped_slots(vm) == set()
    assert isinstance(vm.handle_fault(GPA[2]), Mapped)


@pytest.mark.parametrize("cap", [Q1, Q2])
@pytest.mark.parametrize("change", ["delete", "move"])
def test_slot_zap_all_disabled_zaps_only_the_slot(vms: list[VmCore], change: str, cap: int) -> None:
    """SLOT_ZAP_ALL disabled (by either cap): only the deleted or moved slot's gfns are zapped
    (``kvm_mmu_zap_memslot``); slot 2 keeps every SPTE."""
    vm = _vm(vms)
    _disable(vm, cap, ZAP_ALL)
    _two_mapped_slots(vm)
    before = [s for s in vm.introspect()["sptes"] if s["slot"] == 2]
    _region(vm, 1, GPA[1], 0) if change == "delete" else _region(vm, 1, 3 << 30)
    assert [s for s in vm.introspect()["sptes"] if s["slot"] == 2] == before
    assert _mapped_slots(vm) == {2}


def test_only_default_vms_zap_all(vms: list[VmCore]) -> None:
    """``kvm_arch_flush_shadow_memslot`` applies the quirk to KVM_X86_DEFAULT_VM only: a SW_PROTECTED VM zaps
    just the slot with the quirk still enabled."""
    vm = _vm(vms, vm_type=uapi.KVM_X86_SW_PROTECTED_VM)
    _two_mapped_slots(vm)
    _region(vm, 1, GPA[1], 0)
    assert vm.disabled_quirks == 0 and _mapped_slots(vm) == {2}


@pytest.mark.parametrize("vm_type", [uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM])
def test_6_8_always_zaps_all(vms: list[VmCore], vm_type: int) -> None:
    """6.8 has no SLOT_ZAP_ALL: ``kvm_arch_flush_shadow_memslot`` is ``kvm_mmu_zap_all_fast`` for every VM type,
    and DISABLE_QUIRKS (which accepts the bit) changes nothing."""
    vm = _vm(vms, "6.8", vm_type)
    _disable(vm, Q1, ZAP_ALL)
    _two_mapped_slots(vm)
    _region(vm, 1, GPA[1], 0)
    assert _mapped_slots(vm) == set()


def test_flags_only_change_zaps_only_the_slot(vms: list[VmCore]) -> None:
    """A FLAGS_ONLY change (``kvm_update_flags_memslot``) never goes through ``kvm_arch_flush_shadow_memslot``:
    slot 2 keeps its SPTEs with the quirk enabled."""
    vm = _vm(vms)
    _two_mapped_slots(vm)
    hva = HVA + (1 << 30)
    vm.set_user_memory_region(
        v2=True, slot=1, flags=uapi.KVM_MEM_LOG_DIRTY_PAGES, guest_phys_addr=GPA[1], memory_size=4 * P,
        userspace_addr=hva, hva_live=(hva, hva + 4 * P),
    )  # fmt: skip
    assert _mapped_slots(vm) == {2}


def test_deleting_an_smm_slot_zaps_all_only_with_the_quirk(vms: list[VmCore]) -> None:
    """An address-space-1 (SMM) slot: with the quirk its deletion zaps every SPTE of the VM; without it only
    that slot's, and the sim maps nothing of address space 1, so address space 0 keeps everything."""
    for disable, left in ((False, set()), (True, {1, 2})):
        vm = _vm(vms)
        if disable:
            _disable(vm, Q2, ZAP_ALL)
        _region(vm, 1 << 16 | 3, 1 << 32)
        _two_mapped_slots(vm)
        _region(vm, 1 << 16 | 3, 1 << 32, 0)
        assert _mapped_slots(vm) == left
