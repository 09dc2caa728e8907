"""A kick ending KVM_RUN on the sim, end to end: the engine reports ``Interrupted``, the core's
``VcpuCore.interrupted`` makes it EINTR (``xfer_to_guest_mode_handle_work`` for a running vCPU,
``kvm_vcpu_check_block`` for one blocked in ``kvm_vcpu_block``), with the op and message callers have seen."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from kvmgmem import KvmError
from kvmgmem.backends.sim import SimSystem
from kvmgmem.guest import Asm, GuestImage, GuestVm


def _kicked(run: Callable[[], object], kick: Callable[[], None]) -> KvmError:
    timer = threading.Timer(0.1, kick)
    timer.start()
    try:
        with pytest.raises(KvmError) as info:
            run()
    finally:
        timer.cancel()
        timer.join()
    return info.value


def test_kick_of_a_running_vcpu(simsys: SimSystem) -> None:
    with GuestVm.create(simsys, GuestImage(Asm().label("spin").jmp("spin"))) as guest:
        vcpu = guest.create_vcpu().vcpu
        err = _kicked(vcpu.run, vcpu.kick)
        assert (err.errno, err.op, err.detail) == (errno.EINTR, "KVM_RUN", None)


def test_kick_of_a_blocked_vcpu(open_sim: Callable[..., SimSystem]) -> None:
    with open_sim().create_vm() as vm:
        vm.create_irqchip()
        vm.create_vcpu(0)
        ap = vm.create_vcpu(1)  # waits for INIT/SIPI: kvm_vcpu_block
        err = _kicked(ap.run, ap.kick)
        assert (err.errno, err.op, err.detail) == (errno.EINTR, "KVM_RUN", "blocked vCPU woken by a signal")
        ap.kick()  # immediate_exit before the block: EINTR from KVM_RUN's first check
        err = _kicked(ap.run, lambda: None)
        assert (err.errno, err.op, err.detail) == (errno.EINTR, "KVM_RUN", None)
