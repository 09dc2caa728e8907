"""The VM and vCPU set-up ioctls the selftests' x86 library sends (``vm_create``, ``vm_arch_vcpu_add``):
KVM_CREATE_IRQCHIP, KVM_GET_TSC_KHZ, KVM_SET_NR_MMU_PAGES (x86 ``kvm_arch_vm_ioctl``), KVM_GET/SET_MP_STATE
(``kvm_arch_vcpu_ioctl_get_mpstate``/``_set_mpstate``), KVM_GET_CPUID2 (``kvm_vcpu_ioctl_get_cpuid2``)."""

from __future__ import annotations

import errno
import threading

import kvmgmem
from kvmgmem import uapi

from ._util import raises_kvm

RUNNABLE = uapi.KVM_MP_STATE_RUNNABLE
UNINITIALIZED = uapi.KVM_MP_STATE_UNINITIALIZED
HALTED = uapi.KVM_MP_STATE_HALTED


def test_caps_irqchip_and_tsc_khz(system: kvmgmem.System) -> None:
    """x86 `kvm_vm_ioctl_check_extension`: KVM_CAP_IRQCHIP 1 and KVM_CAP_GET_TSC_KHZ 1 (the selftests require the
    latter before anything else)."""
    assert system.check_extension(uapi.KVM_CAP_IRQCHIP) == 1
    assert system.check_extension(uapi.KVM_CAP_GET_TSC_KHZ) == 1


def test_create_irqchip_once_before_vcpus(system: kvmgmem.System) -> None:
    """KVM_CREATE_IRQCHIP: EEXIST the second time; on a VM that already created a vCPU, EINVAL."""
    with system.create_vm() as vm:
        vm.create_irqchip()
        with raises_kvm(errno.EEXIST, "KVM_CREATE_IRQCHIP"):
            vm.create_irqchip()
    with system.create_vm() as vm:
        vm.create_vcpu(0).close()  # created_vcpus counts vCPUs whose fd is closed too
        with raises_kvm(errno.EINVAL, "KVM_CREATE_IRQCHIP"):
            vm.create_irqchip()


def test_get_tsc_khz_vm_and_vcpu(vm: kvmgmem.Vm) -> None:
    """KVM_GET_TSC_KHZ: the VM's default_tsc_khz is > 0 (the selftests assert it) and a new vCPU's virtual TSC
    runs at that frequency."""
    khz = vm.get_tsc_khz()
    assert khz > 0
    with vm.create_vcpu() as vcpu:
        assert vcpu.get_tsc_khz() == khz


def test_set_nr_mmu_pages_minimum(vm: kvmgmem.Vm) -> None:
    """`kvm_vm_ioctl_set_nr_mmu_pages`: EINVAL below KVM_MIN_ALLOC_MMU_PAGES (64), 64 and more succeed."""
    vm.set_nr_mmu_pages(64)
    vm.set_nr_mmu_pages(1 << 20)
    for bad in (0, 63):
        with raises_kvm(errno.EINVAL, "KVM_SET_NR_MMU_PAGES"):
            vm.set_nr_mmu_pages(bad)


def test_mp_state_without_lapic(vm: kvmgmem.Vm) -> None:
    """Without an in-kernel irqchip every vCPU is RUNNABLE and only RUNNABLE may be set: HALTED, UNINITIALIZED,
    INIT/SIPI_RECEIVED and AP_RESET_HOLD need a local APIC (EINVAL), unknown values are EINVAL."""
    with vm.create_vcpu(0) as v0, vm.create_vcpu(1) as v1:
        assert (v0.get_mp_state(), v1.get_mp_state()) == (RUNNABLE, RUNNABLE)
        v1.set_mp_state(RUNNABLE)
        for bad in (UNINITIALIZED, 2, HALTED, 4, 9, 5, 10, 1 << 31):
            with raises_kvm(errno.EINVAL, "KVM_SET_MP_STATE"):
                v1.set_mp_state(bad)


def test_mp_state_with_lapic(system: kvmgmem.System) -> None:
    """With an in-kernel irqchip the BSP starts RUNNABLE and an AP UNINITIALIZED (`kvm_arch_vcpu_create`);
    HALTED can be set; SIPI_RECEIVED is stored as INIT_RECEIVED with a SIPI pending, which
    `kvm_apic_accept_events` delivers at the next read: RUNNABLE at the SIPI vector's entry (RIP 0, CS 0)."""
    with system.create_vm() as vm:
        vm.create_irqchip()
        with vm.create_vcpu(0) as v0, vm.create_vcpu(1) as v1:
            assert (v0.get_mp_state(), v1.get_mp_state()) == (RUNNABLE, UNINITIALIZED)
            v1.set_mp_state(HALTED)
            assert v1.get_mp_state() == HALTED
            v1.set_mp_state(uapi.KVM_MP_STATE_SIPI_RECEIVED)
            assert v1.get_mp_state() == RUNNABLE
            regs, sregs = v1.get_regs(), v1.get_sregs()
            assert (regs.rip, sregs.cs.selector, sregs.cs.base) == (0, 0, 0)
            with raises_kvm(errno.EINVAL, "KVM_SET_MP_STATE"):
                v1.set_mp_state(5)


def test_uninitialized_ap_blocks_until_kick(system: kvmgmem.System) -> None:
    """KVM_RUN on an AP still waiting for INIT/SIPI blocks in `kvm_vcpu_block`; a signal (a kick from another
    thread) ends it with EINTR."""
    with system.create_vm() as vm:
        vm.create_irqchip()
        with vm.create_vcpu(0), vm.create_vcpu(1) as ap:
            timer = threading.Timer(0.2, ap.kick)
            timer.start()
            try:
                with raises_kvm(errno.EINTR, "KVM_RUN"):
                    ap.run()
            finally:
                timer.cancel()
                timer.join()


def test_get_cpuid2(vm: kvmgmem.Vm) -> None:
    """KVM_GET_CPUID2: empty before KVM_SET_CPUID2; afterwards the entries set (function/index/flags as given);
    E2BIG when the caller's nent is smaller than the table."""
    with vm.create_vcpu() as vcpu:
        assert vcpu.get_cpuid() == []
        assert vcpu.get_cpuid(0) == []
        table = vm.system.get_supported_cpuid()
        vcpu.set_cpuid(table)
        got = vcpu.get_cpuid()
        assert [(e.function, e.index) for e in got] == [(e.function, e.index) for e in table]
        assert len(vcpu.get_cpuid(len(table))) == len(table)
        with raises_kvm(errno.E2BIG, "KVM_GET_CPUID2"):
            vcpu.get_cpuid(len(table) - 1)
