"""The guest's CPUID (``backends/sim/guest_cpuid.py``): KVM's lookup rules in isolation, and a guest with no table."""

from __future__ import annotations

from kvmgmem import uapi
from kvmgmem.backends.sim import SimSystem
from kvmgmem.backends.sim.guest_cpuid import kvm_cpuid, runtime_entries
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import eax, ecx, rax, rbx, rcx, rdx


def _e(function: int, index: int = 0, flags: int = 0, *regs: int) -> uapi.kvm_cpuid_entry2:
    e = uapi.kvm_cpuid_entry2(function=function, index=index, flags=flags)
    e.eax, e.ebx, e.ecx, e.edx = (*regs, 0, 0, 0, 0)[:4]
    return e


def _vendor(text: bytes) -> tuple[int, int, int]:
    b, d, c = (int.from_bytes(text[i : i + 4], "little") for i in (0, 4, 8))
    return b, c, d  # EBX, ECX, EDX


def test_amd_vendor_has_no_max_basic_fallback() -> None:
    """`get_out_of_range_cpuid_entry` is skipped for AMD and Hygon guests: an out-of-range leaf reads zeros."""
    table = [_e(0, 0, 0, 0x10, *_vendor(b"AuthenticAMD")), _e(0x10, 0, 0, 7, 7, 7, 7)]
    assert kvm_cpuid(table, 0x20, 0) == (0, 0, 0, 0)
    intel = [_e(0, 0, 0, 0x10, *_vendor(b"GenuineIntel")), _e(0x10, 0, 0, 7, 7, 7, 7)]
    assert kvm_cpuid(intel, 0x20, 0) == (7, 7, 7, 7)


def test_first_match_without_significant_index() -> None:
    """Without KVM_CPUID_FLAG_SIGNIFCANT_INDEX the first entry of the function answers every index."""
    table = [_e(7, 1, 0, 1, 1, 1, 1), _e(7, 0, 0, 2, 2, 2, 2)]
    assert kvm_cpuid(table, 7, 0) == (1, 1, 1, 1)


def test_topology_leaf_passes_cl_and_x2apic_id() -> None:
    """Leaf 0xB with no entry for the subleaf: zeros, but ECX[7:0] = the index and EDX from subleaf 1."""
    sig = uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    table = [_e(0, 0, 0, 0xB), _e(0xB, 0, sig, 1, 1, 0x100, 5), _e(0xB, 1, sig, 2, 2, 0x201, 5)]
    assert kvm_cpuid(table, 0xB, 0x1234) == (0, 0, 0x34, 5)


def test_runtime_bits() -> None:
    """`kvm_update_cpuid_runtime`: OSXSAVE from CR4.OSXSAVE, APIC from APIC base bit 11, OSPKE from CR4.PKE;
    the stored table is not changed."""
    table = [_e(1, 0, 0, 0, 0, 0, 0), _e(7, 0, uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, 0, 0)]
    out = runtime_entries(table, (1 << 18) | (1 << 22), 1 << 11)
    assert (out[0].ecx, out[0].edx, out[1].ecx) == (1 << 27, 1 << 9, 1 << 4)
    assert (table[0].ecx, table[0].edx, table[1].ecx) == (0, 0, 0)
    cleared = runtime_entries([_e(1, 0, 0, 0, 0, 1 << 27, 1 << 9)], 0, 0)
    assert (cleared[0].ecx, cleared[0].edx) == (0, 0)


def test_guest_without_set_cpuid_reads_zeros(simsys: SimSystem) -> None:
    """A vCPU that never got KVM_SET_CPUID2 has an empty table: every leaf reads 0 (not the emulator's model)."""
    a = Asm()
    for leaf in (0, 1, 0x80000000):
        a.mov(eax, leaf).mov(ecx, 0).cpuid()
        U.sync(a, rax, rbx, rcx, rdx)
    U.done(a)
    with GuestVm.create(simsys, GuestImage(a)) as guest:
        gv = guest.create_vcpu(cpuid=False)
        for _ in range(3):
            assert gv.expect_sync()[:4] == (0, 0, 0, 0)
        gv.run_to_done()
