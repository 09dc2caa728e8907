"""A guest's own private/shared accesses through the C-bit alias, on one sim vCPU
(`kvm_mmu_page_fault`/`kvm_mmu_faultin_pfn`/`kvm_mmu_prepare_memory_fault_exit`).

The VM: SW_PROTECTED, a 2 MiB RAM memslot at 4 GiB backed by a ``HostMemory`` (shared) and a guest_memfd
(private); the guest image maps RAM twice — identity (shared accesses) and ``image.private_va`` (leaf bit 51,
private accesses). Each test's guest does a few accesses separated by SYNCs; the test plays the VMM.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, System, Vm
from kvmgmem.exits import MemoryFaultExit, MmioExit
from kvmgmem.guest import GuestImage, GuestVm
from kvmgmem.guest import ucall as U
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.events import Done, Sync
from kvmgmem.guest.image import PRIVATE_ALIAS_BASE
from kvmgmem.guest.machine import GuestVcpu
from kvmgmem.guest.operands import qword, rax, rbx, rcx, rdi
from kvmgmem.hostmem import HostMemory

GPA = 4 << 30
RAM = 2 << 20
PAGE = uapi.PAGE_SIZE
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
FLAG_PRIVATE = uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
VALUE = 0x1122334455667788
PV = PRIVATE_ALIAS_BASE + GPA  # private VA of GPA


@dataclass
class Env:
    system: System
    vm: Vm
    guest: GuestVm
    vcpu: GuestVcpu
    host: HostMemory
    gmem: GuestMemfd

    def run(self) -> object:
        return self.vcpu.run(timeout=30)

    def set_private(self, gpa: int, size: int = PAGE, private: bool = True) -> None:
        self.vm.set_memory_attributes(gpa, size, PRIVATE if private else 0)

    def shared_u64(self, gpa: int) -> int:
        return int.from_bytes(self.host[gpa - GPA : gpa - GPA + 8], "little")

    def private_u64(self, gpa: int) -> int:
        """The u64 in guest_memfd behind ``gpa`` (read through the model's private fault, as a CPU would)."""
        r = self.vm.sim.handle_fault(gpa, False, False, True)  # type: ignore[attr-defined]
        assert type(r).__name__ == "Mapped", r
        return int.from_bytes(ctypes.string_at(r.host_address_of(gpa), 8), "little")


@contextmanager
def env(
    body: Callable[[Asm], None], *, vm_type: int = uapi.KVM_X86_SW_PROTECTED_VM, private_access_bit: int | None = 51
) -> Iterator[Env]:
    a = Asm()
    body(a)
    U.done(a)
    system = (
        kvmgmem.open("sim")
        if private_access_bit is None
        else kvmgmem.open("sim", private_access_bit=private_access_bit)
    )
    try:
        vm = system.create_vm(vm_type)
        try:
            guest = GuestVm(vm, GuestImage(a, private_alias=51), own_vm=False)
            host = HostMemory(RAM)
            gmem = vm.create_guest_memfd(RAM) if vm_type == uapi.KVM_X86_SW_PROTECTED_VM else None
            try:
                if gmem is not None:
                    guest.add_memory(1, GPA, host, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
                else:
                    guest.add_memory(1, GPA, host)
                vcpu = guest.create_vcpu()
                yield Env(system, vm, guest, vcpu, host, gmem)  # type: ignore[arg-type]
            finally:
                guest.close()
                if gmem is not None:
                    gmem.close()
                host.close()
        finally:
            vm.close()
    finally:
        system.close()


def store(a: Asm, va: int, value: int = VALUE) -> None:
    a.mov(rbx, va).mov(rax, value).mov(qword[rbx], rax)


def load(a: Asm, va: int) -> None:
    a.mov(rbx, va).mov(rax, qword[rbx])
    U.sync(a, rax)


def fault(gpa: int, private: bool) -> MemoryFaultExit:
    return MemoryFaultExit(flags=FLAG_PRIVATE if private else 0, gpa=gpa, size=PAGE, errno=errno.EFAULT)


def test_private_write_to_shared_page_exits_then_lands_in_gmem() -> None:
    off = 0x1238  # an unaligned access in the second page: the exit reports the page
    with env(lambda a: (store(a, PV + off), U.sync(a, 1))) as e:
        assert e.run() == fault(GPA + 0x1000, True)
        assert e.gmem.allocated_bytes() == 0 and e.shared_u64(GPA + off) == 0  # nothing executed
        assert e.run() == fault(GPA + 0x1000, True)  # unresolved: the same exit again
        e.set_private(GPA + 0x1000)
        assert e.run() == Sync((1,))  # the store re-executed
        assert e.private_u64(GPA + off) == VALUE
        assert e.shared_u64(GPA + off) == 0 and bytes(e.host[:]) == bytes(RAM)  # the host never sees it
        assert e.gmem.allocated_bytes() == PAGE
        assert e.run() == Done()


def test_private_read_of_shared_page_exits_with_private_flag() -> None:
    with env(lambda a: load(a, PV + 8)) as e:
        e.host[8:16] = (42).to_bytes(8, "little")  # shared data the private access must not see
        assert e.run() == fault(GPA, True)
        e.set_private(GPA)
        assert e.run() == Sync((0,))  # a fresh (zero) gmem page, not the shared bytes


def test_shared_access_to_private_page_exits_without_flag() -> None:
    def body(a: Asm) -> None:
        store(a, GPA + 0x10, 0xAA)
        U.sync(a, 1)

    with env(body) as e:
        e.set_private(GPA)
        assert e.run() == fault(GPA, False)
        e.set_private(GPA, private=False)
        assert e.run() == Sync((1,))
        assert e.shared_u64(GPA + 0x10) == 0xAA and e.gmem.allocated_bytes() == 0


def test_round_trip_keeps_private_data_and_cache_is_per_access_type() -> None:
    """Private store; then a shared load of the *same* gpa must exit (a translation cache keyed by gpa alone
    would serve it from the cached gmem page); converting back shows the old private data (`kvm_mmu_faultin_pfn`)."""

    def body(a: Asm) -> None:
        store(a, PV)  # private
        load(a, GPA)  # shared
        load(a, PV)  # private again

    with env(body) as e:
        e.set_private(GPA)
        e.host[0:8] = (7).to_bytes(8, "little")
        assert e.run() == fault(GPA, False)
        e.set_private(GPA, private=False)
        assert e.run() == Sync((7,))  # the shared copy, not VALUE
        assert e.run() == fault(GPA, True)
        e.set_private(GPA)
        assert e.run() == Sync((VALUE,))  # no punch: guest_memfd kept it


def test_rep_string_reexecutes_across_pages() -> None:
    """``rep stosq`` over 3 pages through the alias: one exit per page, resumed mid-instruction."""

    def body(a: Asm) -> None:
        a.mov(rdi, PV + 0x800).mov(rcx, (2 * PAGE) // 8).mov(rax, VALUE).rep_stosq()
        U.sync(a, rcx)

    with env(body) as e:
        pages = []
        while True:
            got = e.run()
            if not isinstance(got, MemoryFaultExit):
                break
            assert got.flags == FLAG_PRIVATE and got.errno == errno.EFAULT
            pages.append(got.gpa)
            e.set_private(got.gpa)
        assert pages == [GPA, GPA + PAGE, GPA + 2 * PAGE]
        assert got == Sync((0,))
        for gpa in (GPA + 0x800, GPA + PAGE, GPA + 2 * PAGE + 0x7F8):
            assert e.private_u64(gpa) == VALUE
        assert e.private_u64(GPA + 0x7F8) == 0 and e.private_u64(GPA + 2 * PAGE + 0x800) == 0
        assert bytes(e.host[:]) == bytes(RAM)


def test_identity_accesses_to_shared_memory_are_unchanged() -> None:
    with env(lambda a: (store(a, GPA + 0x100), load(a, GPA + 0x100))) as e:
        assert e.run() == Sync((VALUE,))
        assert e.shared_u64(GPA + 0x100) == VALUE
        assert e.vm.sim.mmu.counters.memory_fault_exits == 0  # type: ignore[attr-defined]


def _alias_store_outcome(**kw: object) -> object:
    with env(lambda a: store(a, PV + 0x10, 0x77), **kw) as e:  # type: ignore[arg-type]
        return e.run()


@pytest.mark.parametrize(
    "kw",
    [
        {"private_access_bit": None},  # the default profile (6.18): no private access bit
        {"vm_type": uapi.KVM_X86_DEFAULT_VM, "private_access_bit": 51},  # the bit is for SW_PROTECTED only
    ],
)
def test_without_the_option_bit_51_is_a_physical_address_bit(kw: dict[str, object]) -> None:
    """As before the option existed: the alias VA translates to gpa | 1 << 51, outside every memslot → MMIO."""
    got = _alias_store_outcome(**kw)
    assert got == MmioExit(phys_addr=(1 << 51) | (GPA + 0x10), data=(0x77).to_bytes(8, "little"), length=8,
                           is_write=True)  # fmt: skip


def test_sim_vm_reports_the_bit_it_honours() -> None:
    with kvmgmem.open("sim", private_access_bit=51) as system:
        with system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as pvm:
            assert pvm.private_access_bit == 51
        with system.create_vm(uapi.KVM_X86_DEFAULT_VM) as dvm:
            assert dvm.private_access_bit is None
    with kvmgmem.open("sim") as system, system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as pvm:
        assert pvm.private_access_bit is None
