"""The sim's vCPU state beyond registers: the in-kernel irqchip mode, mp_state and ``kvm_vcpu_block``."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from kvmgmem import KvmError, uapi
from kvmgmem.backends.sim import SimSystem
from kvmgmem.exits import IoExit
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest.operands import al


def _kicked_run(vcpu: object, delay: float = 0.1) -> KvmError:
    timer = threading.Timer(delay, vcpu.kick)  # type: ignore[attr-defined]
    timer.start()
    try:
        with pytest.raises(KvmError) as info:
            vcpu.run()  # type: ignore[attr-defined]
    finally:
        timer.cancel()
        timer.join()
    return info.value


def test_hlt_with_in_kernel_lapic_halts_in_the_kernel(simsys: SimSystem) -> None:
    """`__kvm_emulate_halt` with an in-kernel local APIC: HLT does not exit; the vCPU becomes HALTED and blocks
    until a signal (EINTR). Nothing models an interrupt, so it stays HALTED until userspace makes it RUNNABLE,
    and then resumes after the HLT."""
    a = Asm()
    a.hlt().out(0x10, al)
    with GuestVm.create(simsys, GuestImage(a)) as guest:
        guest.vm.create_irqchip()
        vcpu = guest.create_vcpu().vcpu
        assert _kicked_run(vcpu).errno == errno.EINTR
        assert vcpu.get_mp_state() == uapi.KVM_MP_STATE_HALTED
        assert _kicked_run(vcpu).errno == errno.EINTR  # still halted: only an interrupt would wake it
        vcpu.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)
        exit = vcpu.run()
        assert isinstance(exit, IoExit) and exit.port == 0x10


def test_hlt_without_irqchip_exits(simsys: SimSystem) -> None:
    """Without an in-kernel irqchip HLT is KVM_EXIT_HLT and the vCPU stays RUNNABLE."""
    a = Asm()
    a.hlt()
    with GuestVm.create(simsys, GuestImage(a)) as guest:
        vcpu = guest.create_vcpu().vcpu
        assert type(vcpu.run()).__name__ == "HltExit"
        assert vcpu.get_mp_state() == uapi.KVM_MP_STATE_RUNNABLE


def test_close_wakes_a_blocked_vcpu(open_sim: Callable[..., SimSystem]) -> None:
    """Closing a vCPU blocked in KVM_RUN (an AP waiting for INIT/SIPI) kicks it out first: the run ends with
    EINTR and close() returns."""
    with open_sim().create_vm() as vm:
        vm.create_irqchip()
        vm.create_vcpu(0)
        ap = vm.create_vcpu(1)
        errors: list[int] = []

        def run() -> None:
            try:
                ap.run()
            except KvmError as e:
                errors.append(e.errno or 0)

        t = threading.Thread(target=run)
        t.start()
        t.join(0.1)
        ap.close()
        t.join(5)
        assert not t.is_alive() and errors in ([errno.EINTR], [errno.EBADF])


def test_tsc_khz_profile_option(open_sim: Callable[..., SimSystem]) -> None:
    """KVM_GET_TSC_KHZ answers the profile's nominal ``tsc_khz``; a value that does not fit the ioctl's int
    return is refused at open."""
    with open_sim(tsc_khz=1_000_000).create_vm() as vm:
        assert vm.get_tsc_khz() == 1_000_000
    with pytest.raises(ValueError):
        open_sim(tsc_khz=1 << 31)
