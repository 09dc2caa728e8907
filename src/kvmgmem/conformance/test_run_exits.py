"""KVM_RUN exits set_memory_region_test.c checks outside memslot handling: KVM_RUN on a vCPU in its RESET state
with no memory at all (`test_zero_memory_regions`: KVM_EXIT_INTERNAL_ERROR, the emulator cannot fetch from
MMIO, `handle_emulation_failure`), and an exception whose IDT lies in MMIO (`test_mmio_during_vectoring`:
KVM_INTERNAL_ERROR_DELIVERY_EV from `kvm_prepare_event_vectoring_exit`, data[3] the gpa of the gate)."""

from __future__ import annotations

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.exits import InternalErrorExit, ShutdownExit

from ._util import MEM_REGION_GPA, HostDefect, expect_host_defect
from .fixtures import MakeGuest

VEC_GP = 13
IDT_ENTRY = 16
NONCANONICAL = 0xAAAAAAAAAAAAAAAA  # set_memory_region_test.c's non-canonical address


def test_zero_memory_regions(vm: kvmgmem.Vm) -> None:
    """`test_zero_memory_regions`: no memslot at all, a vCPU in RESET state (real mode, fetch at 0xfffffff0),
    KVM_SET_NR_MMU_PAGES(64), KVM_RUN → KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_EMULATION:
    the fetch is MMIO and cannot be emulated. The data are the flags word (0: no instruction bytes) and the
    five exit-info words (`prepare_emulation_failure_exit`); RIP stays at the reset vector."""
    vm.set_nr_mmu_pages(64)
    with vm.create_vcpu(0) as vcpu:
        exit = vcpu.run()
        assert isinstance(exit, InternalErrorExit), exit
        assert exit.suberror == uapi.KVM_INTERNAL_ERROR_EMULATION
        assert len(exit.data) == 6 and exit.data[0] == 0, exit.data
        assert vcpu.get_regs().rip == 0xFFF0


def test_mmio_during_vectoring(request: pytest.FixtureRequest, backend: str, make_guest: MakeGuest) -> None:
    """`test_mmio_during_vectoring`: the guest loads an IDT based at 0xc0000000 (mapped in its page tables, no
    memslot) and writes to a non-canonical address; delivering the #GP must read the gate from MMIO, which KVM
    cannot emulate while vectoring: KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_DELIVERY_EV, ndata ≠ 4,
    data[3] = the IDT base + 13 * 16."""
    from kvmgmem.guest import Asm, GuestImage
    from kvmgmem.guest.operands import byte, rax

    defect = expect_host_defect(request, backend, "vectoring_mmio_shutdown")
    a = Asm()
    idtr = a.rodata((0xFFF).to_bytes(2, "little") + MEM_REGION_GPA.to_bytes(8, "little"), "idtr", align=16)
    a.lidt(idtr)
    a.mov(rax, NONCANONICAL)
    a.mov(byte[rax], 1)
    guest = make_guest(GuestImage(a))
    exit = guest.vcpus[0].vcpu.run()
    if defect and isinstance(exit, ShutdownExit):
        raise HostDefect(f"KVM_RUN gave {exit} instead of the delivery-error exit")
    assert isinstance(exit, InternalErrorExit), exit
    assert exit.suberror == uapi.KVM_INTERNAL_ERROR_DELIVERY_EV, exit
    assert len(exit.data) != 4, exit.data
    assert exit.data[3] == MEM_REGION_GPA + VEC_GP * IDT_ENTRY, [hex(d) for d in exit.data]
