"""The kernel rules the sim's CPU layer reports to instead of deciding, on plain objects (no unicorn, no fd).

Hypercall emulation (``core/hypercall.py``: ``kvm_emulate_hypercall``, ``__kvm_emulate_hypercall``,
``user_exit_on_hypercall``) with the KVM_CAP_EXIT_HYPERCALL mask only the core holds, and KVM_RUN's EINTR when a
kick ends a run or a block (``VcpuCore.interrupted``). The CPU-layer tests (``tests/sim/cpu``) check that the
CPU passes the registers and applies the answer; the conformance suite checks the same values end to end.
"""

from __future__ import annotations

import errno

import pytest

from kvmgmem import uapi
from kvmgmem.backends.sim.core import create_vm, get_profile
from kvmgmem.backends.sim.core.hypercall import (
    KVM_HC_VAPIC_POLL_IRQ,
    HypercallUserExit,
    emulate_hypercall,
    user_exit_on_hypercall,
)
from kvmgmem.backends.sim.core.vcpu import VcpuCore
from kvmgmem.errors import KvmError

MAP = uapi.KVM_HC_MAP_GPA_RANGE
ENABLED = 1 << MAP
U64 = (1 << 64) - 1


def test_cpl_above_zero_is_eperm_before_anything_else() -> None:
    for cpl in (1, 2, 3):
        for nr in (MAP, KVM_HC_VAPIC_POLL_IRQ, 99):
            assert emulate_hypercall(ENABLED, cpl, nr, 0x1000, 1, 0, 0) == -uapi.KVM_EPERM


def test_vapic_poll_irq_returns_zero() -> None:
    assert emulate_hypercall(0, 0, KVM_HC_VAPIC_POLL_IRQ, 1, 2, 3, 4) == 0


def test_unknown_numbers_are_enosys() -> None:
    for nr in (0, 5, 11, 13, 99, U64):
        assert emulate_hypercall(U64, 0, nr, 0, 0, 0, 0) == -uapi.KVM_ENOSYS, nr


def test_map_gpa_range_is_enosys_unless_its_exit_is_enabled() -> None:
    assert emulate_hypercall(0, 0, MAP, 0x200000, 4, 0x10, 0) == -uapi.KVM_ENOSYS
    assert emulate_hypercall(ENABLED, 0, MAP, 0x200000, 4, 0x10, 0) == HypercallUserExit(MAP, (0x200000, 4, 0x10))
    assert emulate_hypercall(ENABLED, 0, MAP, 0x200000, 4, 0x10, 0) == HypercallUserExit(MAP, (0x200000, 4, 0x10), True)


@pytest.mark.parametrize(
    ("gpa", "npages"),
    [(0x200001, 1), (0x200FFF, 1), (0x200000, 0), (0x1000, U64), (U64 & ~0xFFF, (1 << 64) - (1 << 52) + 1)],
    ids=["unaligned", "unaligned-end", "no-pages", "wraps", "wraps-at-top"],
)
def test_map_gpa_range_bad_arguments_are_einval(gpa: int, npages: int) -> None:
    assert emulate_hypercall(ENABLED, 0, MAP, gpa, npages, 0, 0) == -uapi.KVM_EINVAL


def test_map_gpa_range_largest_range_that_does_not_wrap_exits() -> None:
    gfn = 0x1000 >> 12
    npages = (1 << 64) - 1 - gfn  # gfn + npages == 2**64 - 1: no wrap
    assert emulate_hypercall(ENABLED, 0, MAP, 0x1000, npages, 7, 0) == HypercallUserExit(MAP, (0x1000, npages, 7))


def test_user_exit_mask_bits() -> None:
    assert user_exit_on_hypercall(ENABLED, MAP)
    assert not user_exit_on_hypercall(ENABLED, MAP - 1)
    assert not user_exit_on_hypercall(U64, 64)  # past the mask: never (the kernel's BIT() of a u64)


def test_the_vm_holds_the_mask_enable_cap_sets() -> None:
    """``VmCore.emulate_hypercall`` follows KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL) as soon as it is set: no copy
    of the mask lives anywhere else."""
    vm = create_vm(get_profile("6.18"), uapi.KVM_X86_DEFAULT_VM)
    assert vm.emulate_hypercall(0, MAP, 0x200000, 4, 0, 0) == -uapi.KVM_ENOSYS
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, (ENABLED, 0, 0, 0))
    assert vm.emulate_hypercall(0, MAP, 0x200000, 4, 0, 0) == HypercallUserExit(MAP, (0x200000, 4, 0))
    assert vm.emulate_hypercall(3, MAP, 0x200000, 4, 0, 0) == -uapi.KVM_EPERM
    vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 0, (0, 0, 0, 0))
    assert vm.emulate_hypercall(0, MAP, 0x200000, 4, 0, 0) == -uapi.KVM_ENOSYS


@pytest.mark.parametrize("blocked", [False, True])
def test_a_kicked_run_is_eintr(blocked: bool) -> None:
    """What the CPU reports as ``Interrupted`` becomes KVM_RUN's EINTR here (KVM_EXIT_INTR), with the message a
    block ending in a signal has always had."""
    err = VcpuCore(0, lapic=True).interrupted(blocked)
    assert isinstance(err, KvmError) and err.errno == errno.EINTR and err.op == "KVM_RUN"
    assert err.detail == ("blocked vCPU woken by a signal" if blocked else None)
