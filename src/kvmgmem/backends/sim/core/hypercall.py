"""KVM's hypercall emulation (``kvm_emulate_hypercall``, ``__kvm_emulate_hypercall``): what a VMCALL returns.

Why in the core: who may make a hypercall (CPL 0), which numbers exist, which arguments KVM_HC_MAP_GPA_RANGE
accepts and whether it reaches userspace (KVM_CAP_EXIT_HYPERCALL's mask, a VM setting) are kernel rules. The
CPU layer only recognises the VMCALL/VMMCALL, reads the registers and applies the answer — RAX and RIP past the
instruction, or the exit — asking through its resolver (``cpu.types.GpaResolver.emulate_hypercall``), which the
adapter implements with ``VmCore.emulate_hypercall``. Hypercalls are rare: nothing here is on a hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmgmem import uapi

#: ``KVM_HC_VAPIC_POLL_IRQ``: a no-op that only makes the vCPU re-check interrupts; returns 0.
KVM_HC_VAPIC_POLL_IRQ = 1
_PAGE_SHIFT = 12
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class HypercallUserExit:
    """The hypercall exits to userspace (KVM_EXIT_HYPERCALL) instead of returning: ``kvm_run.hypercall``'s
    ``nr``, ``args[0..2]`` and whether the guest was in 64-bit mode (KVM_EXIT_HYPERCALL_LONG_MODE). Userspace's
    answer (``complete_hypercall``) becomes RAX on the next KVM_RUN (``complete_hypercall_exit``)."""

    nr: int
    args: tuple[int, int, int]
    long_mode: bool = True


def user_exit_on_hypercall(exit_enabled: int, nr: int) -> bool:
    """``user_exit_on_hypercall``: bit ``nr`` of KVM_CAP_EXIT_HYPERCALL's mask (``hypercall_exit_enabled``)."""
    return nr < 64 and bool((exit_enabled >> nr) & 1)


def emulate_hypercall(
    exit_enabled: int, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int
) -> int | HypercallUserExit:
    """``__kvm_emulate_hypercall`` for a 64-bit guest: the signed value for RAX, or the exit to userspace.

    At CPL > 0 every hypercall is -KVM_EPERM. KVM_HC_VAPIC_POLL_IRQ returns 0. KVM_HC_MAP_GPA_RANGE (gpa ``a0``,
    ``a1`` pages, attributes ``a2``) is -KVM_ENOSYS unless userspace enabled its exit, -KVM_EINVAL for an
    unaligned gpa, zero pages or a range whose end wraps, and otherwise exits to userspace. Any other number is
    -KVM_ENOSYS (the PV features behind KICK_CPU, SEND_IPI, SCHED_YIELD and CLOCK_PAIRING are not modelled).
    ``a3`` (RSI) is read by the kernel for KVM_HC_CLOCK_PAIRING only; it is taken to keep the CPU's side the
    kernel's register set.
    """
    del a3
    if cpl != 0:
        return -uapi.KVM_EPERM
    if nr == KVM_HC_VAPIC_POLL_IRQ:
        return 0
    if nr == uapi.KVM_HC_MAP_GPA_RANGE:
        if not user_exit_on_hypercall(exit_enabled, nr):
            return -uapi.KVM_ENOSYS
        gfn = a0 >> _PAGE_SHIFT
        if a0 & ((1 << _PAGE_SHIFT) - 1) or a1 == 0 or (gfn + a1) & _U64 <= gfn:
            return -uapi.KVM_EINVAL
        return HypercallUserExit(nr, (a0, a1, a2))
    return -uapi.KVM_ENOSYS
