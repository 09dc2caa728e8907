"""The vCPU's kernel rules in the core (``core/vcpu.py``, ``core/cpuid_tables.py``, ``core/x86_vm.py``) on plain
objects: no fd, no unicorn.

KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2/KVM_GET_CPUID2 (``kvm_vcpu_ioctl_set_cpuid2``, ``kvm_set_cpuid``,
``kvm_check_cpuid``, ``kvm_cpuid_check_equal``, ``kvm_vcpu_ioctl_get_cpuid2``), the mp_state rules
(``kvm_arch_vcpu_create``, ``kvm_arch_vcpu_ioctl_set_mpstate``, ``kvm_apic_accept_events``, ``__kvm_emulate_halt``),
KVM_RUN's entry and the RESET real-mode fetch, KVM_CREATE_IRQCHIP and KVM_SET_NR_MMU_PAGES (``kvm_arch_vm_ioctl``,
``kvm_vm_ioctl_set_nr_mmu_pages``). The conformance suite checks the same errnos end to end on both backends.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import PROFILES, get_profile
from kvmgmem.backends.sim.core.cpuid_tables import check_cpuid, cpuid_equal, supported_cpuid
from kvmgmem.backends.sim.core.vcpu import VcpuCore
from kvmgmem.backends.sim.core.x86_vm import X86Vm
from kvmgmem.backends.sim.fault import Mapped, MemoryFault, Mmio, Retry
from kvmgmem.errors import KvmError

Entry = uapi.kvm_cpuid_entry2
KVM_MP_STATE_STOPPED = 5  # s390 only: unknown to x86


def failure(fn: Callable[[], object], op: str) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    assert info.value.op == op
    return info.value.errno


def entry(function: int, eax: int = 0, index: int = 0) -> Entry:
    e = Entry()
    e.function, e.eax, e.index = function, eax, index
    return e


def table(entries: list[Entry], nent: int | None = None) -> object:
    """A ``struct kvm_cpuid2`` holding ``entries``; ``nent`` may claim more (the kernel reads nent first)."""
    t = uapi.cpuid2_type(max(len(entries), 1))()
    t.nent = len(entries) if nent is None else nent
    for i, e in enumerate(entries):
        t.entries[i] = e
    return t


def no_current() -> list[Entry]:
    raise AssertionError("the runtime table is read only once the vCPU has run")


# --- KVM_SET_CPUID2 / KVM_GET_CPUID2 -------------------------------------------------------------------------------


def test_set_cpuid2_e2big_before_anything_else() -> None:
    vcpu = VcpuCore(0, lapic=False)
    big = table([entry(0)], nent=uapi.KVM_MAX_CPUID_ENTRIES + 1)
    assert failure(lambda: vcpu.set_cpuid2(big, no_current), "KVM_SET_CPUID2") == errno.E2BIG
    vcpu.entered()
    assert failure(lambda: vcpu.set_cpuid2(big, no_current), "KVM_SET_CPUID2") == errno.E2BIG
    assert vcpu.cpuid == []


def test_set_cpuid2_before_the_run_replaces_the_table_and_checks_it() -> None:
    vcpu = VcpuCore(0, lapic=False)
    first = vcpu.set_cpuid2(table([entry(0, eax=1), entry(1)]), no_current)
    assert first is not None and [e.function for e in first] == [0, 1] == [e.function for e in vcpu.cpuid]
    second = vcpu.set_cpuid2(table([entry(0x80000008, eax=57 << 8)]), no_current)
    assert second is not None and [e.function for e in vcpu.cpuid] == [0x80000008]
    bad = table([entry(0x80000008, eax=39 << 8)])
    assert failure(lambda: vcpu.set_cpuid2(bad, no_current), "KVM_SET_CPUID2") == errno.EINVAL
    assert [e.function for e in vcpu.cpuid] == [0x80000008]  # a refused table leaves the old one


def test_set_cpuid2_after_the_run_accepts_only_the_same_table() -> None:
    vcpu = VcpuCore(0, lapic=False)
    entries = [entry(0, eax=0xD), entry(1)]
    vcpu.set_cpuid2(table(entries), no_current)
    vcpu.entered()
    assert vcpu.set_cpuid2(table(entries), lambda: entries) is None  # accepted, nothing to load
    changed = [entry(0, eax=0xD), entry(1, eax=1)]
    assert failure(lambda: vcpu.set_cpuid2(table(changed), lambda: entries), "KVM_SET_CPUID2") == errno.EINVAL
    assert failure(lambda: vcpu.set_cpuid2(table(entries[:1]), lambda: entries), "KVM_SET_CPUID2") == errno.EINVAL
    # compared with the runtime table (KVM-owned bits refreshed), not with what userspace set
    assert vcpu.set_cpuid2(table(changed), lambda: changed) is None


def test_cpuid_table_rules() -> None:
    assert check_cpuid([]) is None
    for bits in (0, 48, 57):
        assert check_cpuid([entry(0x80000008, eax=(bits << 8) | 52)]) is None
    assert "39" in (check_cpuid([entry(0x80000008, eax=39 << 8)]) or "")
    # kvm_find_cpuid_entry: the first entry of the leaf, whatever its index
    assert check_cpuid([entry(0x80000008, eax=48 << 8, index=3), entry(0x80000008, eax=40 << 8)]) is None
    a = [entry(0), entry(7, index=1)]
    assert cpuid_equal(a, [entry(0), entry(7, index=1)])
    assert not cpuid_equal(a, [entry(7, index=1), entry(0)])
    assert not cpuid_equal(a, [entry(0), entry(7, index=0)])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_supported_table_is_one_set_cpuid2_takes(profile: str) -> None:
    supported = supported_cpuid(get_profile(profile))
    assert check_cpuid(supported) is None and len(supported) <= uapi.KVM_MAX_CPUID_ENTRIES
    leaf = next(e for e in supported if e.function == 0x80000008)
    assert leaf.eax & 0xFF == min(get_profile(profile).max_gpa_bits, 48)
    vcpu = VcpuCore(0, lapic=False)
    assert vcpu.set_cpuid2(table(supported), no_current) is not None


def test_get_cpuid2_e2big_for_a_buffer_smaller_than_the_table() -> None:
    vcpu = VcpuCore(0, lapic=False)
    vcpu.get_cpuid2(0)  # no table: any room will do
    vcpu.set_cpuid2(table([entry(0), entry(1), entry(7)]), no_current)
    for room in (3, 256):
        vcpu.get_cpuid2(room)
    assert failure(lambda: vcpu.get_cpuid2(2), "KVM_GET_CPUID2") == errno.E2BIG


# --- mp_state ------------------------------------------------------------------------------------------------------


def test_initial_mp_state_follows_the_irqchip() -> None:
    vm = X86Vm()
    assert vm.vcpu_create(0).mp_state == vm.vcpu_create(1).mp_state == uapi.KVM_MP_STATE_RUNNABLE
    vm.create_irqchip(0)
    bsp, ap = vm.vcpu_create(0), vm.vcpu_create(1)
    assert bsp.lapic and ap.lapic
    assert bsp.mp_state == uapi.KVM_MP_STATE_RUNNABLE and not bsp.must_block
    assert ap.mp_state == uapi.KVM_MP_STATE_UNINITIALIZED and ap.must_block


def test_set_mp_state_without_a_local_apic_takes_only_runnable() -> None:
    vcpu = VcpuCore(0, lapic=False)
    vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
    for value in (
        uapi.KVM_MP_STATE_UNINITIALIZED,
        uapi.KVM_MP_STATE_HALTED,
        uapi.KVM_MP_STATE_AP_RESET_HOLD,
        uapi.KVM_MP_STATE_INIT_RECEIVED,
        uapi.KVM_MP_STATE_SIPI_RECEIVED,
        KVM_MP_STATE_STOPPED,
        0xFFFF_FFFF,
    ):
        assert failure(lambda v=value: vcpu.set_mp_state(v), "KVM_SET_MP_STATE") == errno.EINVAL
    assert vcpu.mp_state == uapi.KVM_MP_STATE_RUNNABLE


def test_set_mp_state_with_a_local_apic_and_the_sipi() -> None:
    vcpu = VcpuCore(1, lapic=True)
    assert failure(lambda: vcpu.set_mp_state(KVM_MP_STATE_STOPPED), "KVM_SET_MP_STATE") == errno.EINVAL
    vcpu.set_mp_state(uapi.KVM_MP_STATE_HALTED)
    assert vcpu.mp_state == uapi.KVM_MP_STATE_HALTED and vcpu.must_block
    assert vcpu.accept_events() is None  # no SIPI pending
    vcpu.set_mp_state(uapi.KVM_MP_STATE_SIPI_RECEIVED)  # obsolete: INIT_RECEIVED with the SIPI pending
    assert vcpu.mp_state == uapi.KVM_MP_STATE_INIT_RECEIVED and vcpu.sipi_pending
    assert vcpu.accept_events() == 0  # the vector whose entry the registers get
    assert vcpu.mp_state == uapi.KVM_MP_STATE_RUNNABLE and not vcpu.sipi_pending
    assert vcpu.accept_events() is None
    # a pending SIPI is dropped when the vCPU is no longer waiting in INIT_RECEIVED
    vcpu.set_mp_state(uapi.KVM_MP_STATE_SIPI_RECEIVED)
    vcpu.set_mp_state(uapi.KVM_MP_STATE_HALTED)
    assert vcpu.accept_events() is None and not vcpu.sipi_pending
    assert vcpu.mp_state == uapi.KVM_MP_STATE_HALTED


# --- KVM_RUN --------------------------------------------------------------------------------------------------------


def test_run_entry_immediate_exit_is_eintr() -> None:
    vcpu = VcpuCore(0, lapic=False)
    vcpu.run_entry(immediate_exit=False)
    assert failure(lambda: vcpu.run_entry(immediate_exit=True), "KVM_RUN") == errno.EINTR
    assert not vcpu.has_run
    vcpu.entered()
    assert vcpu.has_run


def test_hlt_halts_in_the_kernel_only_with_a_local_apic() -> None:
    plain, with_apic = VcpuCore(0, lapic=False), VcpuCore(0, lapic=True)
    assert not plain.emulate_halt() and plain.mp_state == uapi.KVM_MP_STATE_RUNNABLE
    assert with_apic.emulate_halt() and with_apic.mp_state == uapi.KVM_MP_STATE_HALTED and with_apic.must_block


def test_reset_fetch_gpa() -> None:
    vcpu = VcpuCore(0, lapic=False)
    assert failure(lambda: vcpu.reset_fetch_gpa(0x60000011, 0xFFFF0000, 0xFFF0), "KVM_RUN") == errno.EINVAL
    assert not vcpu.has_run
    assert vcpu.reset_fetch_gpa(0x60000010, 0xFFFF0000, 0xFFF0) == 0xFFFFFFF0  # the RESET vector
    assert vcpu.has_run
    assert vcpu.reset_fetch_gpa(0x10, 0x1000, 0x1_0020) == 0x1020  # IP is 16 bits
    assert vcpu.reset_fetch_gpa(0x10, 0xFFFFFFF0, 0x20) == 0x10  # the address wraps at 4 GiB


def test_reset_fetch_outcomes() -> None:
    vcpu = VcpuCore(0, lapic=False)
    mmio, fault = Mmio(0xFFFFFFF0), MemoryFault(flags=0, gpa=0xFFFFF000, size=0x1000, errno=errno.EFAULT)
    assert vcpu.reset_fetch(0xFFFFFFF0, mmio, lambda: True) is mmio
    assert vcpu.reset_fetch(0xFFFFF000, fault, lambda: True) is fault
    # kvm_handle_error_pfn: an hva that cannot be faulted in fails KVM_RUN with a bare EFAULT, no exit
    unreported = MemoryFault(flags=0, gpa=0xFFFFF000, size=0x1000, errno=errno.EFAULT, reported=False)
    assert failure(lambda: vcpu.reset_fetch(0xFFFFF000, unreported, lambda: True), "KVM_RUN") == errno.EFAULT
    assert vcpu.reset_fetch(0x1000, Retry(), lambda: False) is None
    assert failure(lambda: vcpu.reset_fetch(0x1000, Retry(), lambda: True), "KVM_RUN") == errno.EINTR
    mapped = Mapped(0x7F0000000000)
    assert failure(lambda: vcpu.reset_fetch(0x1000, mapped, lambda: True), "KVM_RUN") == errno.EINVAL


# --- the VM's x86 set-up ---------------------------------------------------------------------------------------------


def test_create_irqchip_eexist_then_einval_after_vcpus() -> None:
    vm = X86Vm()
    assert failure(lambda: vm.create_irqchip(1), "KVM_CREATE_IRQCHIP") == errno.EINVAL
    assert not vm.irqchip_in_kernel
    vm.create_irqchip(0)
    assert vm.irqchip_in_kernel
    assert failure(lambda: vm.create_irqchip(0), "KVM_CREATE_IRQCHIP") == errno.EEXIST
    assert failure(lambda: vm.create_irqchip(3), "KVM_CREATE_IRQCHIP") == errno.EEXIST  # EEXIST is checked first


def test_set_nr_mmu_pages_minimum() -> None:
    vm = X86Vm()
    for pages in (0, uapi.KVM_MIN_ALLOC_MMU_PAGES - 1):
        assert failure(lambda p=pages: vm.set_nr_mmu_pages(p), "KVM_SET_NR_MMU_PAGES") == errno.EINVAL
    assert vm.n_requested_mmu_pages == 0
    vm.set_nr_mmu_pages(uapi.KVM_MIN_ALLOC_MMU_PAGES)
    vm.set_nr_mmu_pages((1 << 64) - 1)
    assert vm.n_requested_mmu_pages == (1 << 64) - 1
