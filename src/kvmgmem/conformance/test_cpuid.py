"""The guest's CPUID instruction answers from the KVM_SET_CPUID2 table (``kvm_emulate_cpuid`` / ``kvm_cpuid``):
exact function/index matches (the index only when KVM_CPUID_FLAG_SIGNIFCANT_INDEX is set), zeros inside a
class's range, the maximum basic leaf for functions beyond it, KVM-owned bits refreshed
(``kvm_update_cpuid_runtime``); and KVM_SET_CPUID2's own checks (``kvm_vcpu_ioctl_set_cpuid2``,
``kvm_check_cpuid``, ``kvm_cpuid_check_equal``)."""

from __future__ import annotations

import errno

import pytest

import kvmgmem
from kvmgmem import uapi

from ._util import HostDefect, expect_host_defect, raises_kvm
from .fixtures import MakeGuest

SIGNIFICANT = uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
MAX_BASIC = 0x10
APIC = 1 << 9


def _entry(function: int, index: int = 0, flags: int = 0, *regs: int) -> uapi.kvm_cpuid_entry2:
    e = uapi.kvm_cpuid_entry2(function=function, index=index, flags=flags)
    e.eax, e.ebx, e.ecx, e.edx = (*regs, 0, 0, 0, 0)[:4]
    return e


def _table() -> list[uapi.kvm_cpuid_entry2]:
    vendor = [int.from_bytes(b"KvmGmemTest!"[i : i + 4], "little") for i in (0, 8, 4)]  # EBX, ECX, EDX order
    return [
        _entry(0, 0, 0, MAX_BASIC, vendor[0], vendor[1], vendor[2]),
        _entry(1, 0, 0, 0x000806F0, 0, 0, 0x078BF9FF),  # APIC (bit 9) left clear: KVM owns it
        _entry(4, 0, SIGNIFICANT, 0x40, 0x41, 0x42, 0x43),
        _entry(4, 1, SIGNIFICANT, 0x50, 0x51, 0x52, 0x53),
        _entry(5, 7, 0, 0x60, 0x61, 0x62, 0x63),  # index not significant: any subleaf
        _entry(MAX_BASIC, 3, SIGNIFICANT, 0x70, 0x71, 0x72, 0x73),
        _entry(0x80000000, 0, 0, 0x80000008),
        _entry(0x80000001, 0, 0, 0, 0, 0, (1 << 29) | (1 << 20) | (1 << 11)),
        _entry(0x80000008, 0, 0, 0x3030),
    ]


#: (function, index) the guest asks, and what kvm_cpuid answers.
QUERIES = [
    ((4, 1), (0x50, 0x51, 0x52, 0x53)),  # exact, significant index
    ((4, 2), (0, 0, 0, 0)),  # no such subleaf, inside the basic range: zeros
    ((5, 0), (0x60, 0x61, 0x62, 0x63)),  # index not significant
    ((3, 0), (0, 0, 0, 0)),  # inside the range, no entry
    ((0x20, 3), (0x70, 0x71, 0x72, 0x73)),  # beyond max basic: the max basic leaf, same index
    ((0x20, 0), (0, 0, 0, 0)),  # ... whose subleaf 0 does not exist
    ((0x80000009, 3), (0x70, 0x71, 0x72, 0x73)),  # beyond the extended class's maximum
    ((0x40000005, 3), (0x70, 0x71, 0x72, 0x73)),  # no hypervisor class entry at all
]


def _cpuid_guest(queries: list[tuple[int, int]]) -> object:
    from kvmgmem.guest import Asm, GuestImage
    from kvmgmem.guest import ucall as U
    from kvmgmem.guest.operands import eax, ecx, rax, rbx, rcx, rdx

    a = Asm()
    for function, index in queries:
        a.mov(eax, function).mov(ecx, index).cpuid()
        U.sync(a, rax, rbx, rcx, rdx)
    U.done(a)
    return GuestImage(a)


def test_guest_cpuid_reads_the_set_table(make_guest: MakeGuest) -> None:
    """CPUID in the guest (CPL0) returns the KVM_SET_CPUID2 entries by KVM's lookup rules, whatever the CPU
    (or the CPU emulator) would say itself."""
    queries = [(0, 0), *(q for q, _ in QUERIES)]
    gv = make_guest(_cpuid_guest(queries)).vcpus[0]
    gv.vcpu.set_cpuid(_table())
    leaf0 = _table()[0]
    assert gv.expect_sync()[:4] == (leaf0.eax, leaf0.ebx, leaf0.ecx, leaf0.edx)
    got = [gv.expect_sync()[:4] for _ in QUERIES]
    assert got == [want for _, want in QUERIES]
    gv.run_to_done()


def test_guest_cpuid_leaf1_kvm_owned_bits(request: pytest.FixtureRequest, backend: str, make_guest: MakeGuest) -> None:
    """Leaf 1 as set, except the bits KVM owns (`kvm_update_cpuid_runtime`): APIC follows the APIC base MSR's
    enable bit, OSXSAVE follows CR4.OSXSAVE (clear here)."""
    defect = expect_host_defect(request, backend, "cpuid_host_bits")
    gv = make_guest(_cpuid_guest([(1, 0)])).vcpus[0]
    gv.vcpu.set_cpuid(_table())
    leaf1 = gv.expect_sync()[:4]
    apic_enabled = bool(gv.vcpu.get_sregs().apic_base & (1 << 11))
    want = (0x000806F0, 0, 0, 0x078BF9FF | (APIC if apic_enabled else 0))
    if defect and leaf1 != want:
        raise HostDefect(
            f"leaf 1 = {[hex(r) for r in leaf1]}, the table (with KVM's bits) says {[hex(r) for r in want]}"
        )
    assert leaf1 == want, [hex(r) for r in leaf1]
    gv.run_to_done()


def test_set_cpuid2_rules(vm: kvmgmem.Vm) -> None:
    """KVM_SET_CPUID2: E2BIG past 256 entries; EINVAL for a linear-address width other than 48/57/0 in
    0x80000008; an empty table is accepted (every leaf then reads 0) and KVM_GET_CPUID2 returns it."""
    with vm.create_vcpu() as vcpu:
        with raises_kvm(errno.E2BIG, "KVM_SET_CPUID2"):
            vcpu.set_cpuid([_entry(0)] * 257)
        with raises_kvm(errno.EINVAL, "KVM_SET_CPUID2"):
            vcpu.set_cpuid([_entry(0x80000008, 0, 0, 0x2830)])  # 40 linear-address bits
        vcpu.set_cpuid([])
        assert vcpu.get_cpuid() == []


def test_set_cpuid2_after_run_only_same_table(make_guest: MakeGuest) -> None:
    """After the first KVM_RUN only the table already set (KVM-owned bits as KVM keeps them, i.e. as
    KVM_GET_CPUID2 returns it) may be set again; any other table is EINVAL (`kvm_cpuid_check_equal`)."""
    from kvmgmem.guest import Asm, GuestImage
    from kvmgmem.guest import ucall as U

    a = Asm()
    U.sync(a)
    U.done(a)
    gv = make_guest(GuestImage(a)).vcpus[0]
    gv.vcpu.set_cpuid(_table())
    gv.expect_sync()
    gv.vcpu.set_cpuid(gv.vcpu.get_cpuid())
    changed = _table()
    changed[2].eax ^= 1
    with raises_kvm(errno.EINVAL, "KVM_SET_CPUID2"):
        gv.vcpu.set_cpuid(changed)
    gv.run_to_done()
