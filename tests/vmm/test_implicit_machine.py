"""The VMM's implicit conversion path end to end: ``Machine(private_access_bit=51)`` answering the guest's
memory faults with the conversion service, with 1 and 2 vCPUs, every discard policy, and the demo using both
conversion sources."""

from __future__ import annotations

import ctypes

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.image import PRIVATE_ALIAS_BASE, GuestImage
from kvmgmem.guest.machine import GuestVcpu
from kvmgmem.vmm.convert import DiscardPolicy
from kvmgmem.vmm.demo import run_demo
from kvmgmem.vmm.machine import Machine
from kvmgmem.vmm.workload import (
    PRIVATE_BYTE,
    ROUNDS,
    STOP,
    SYNC_CHECK_HIDDEN,
    SYNC_CHECK_SHARED,
    Expectations,
    implicit_conversion_workload,
)

GPA = 4 << 30
RANGE = 64 << 10  # per vCPU: 16 pages → 64 memory-fault exits per round
PAGES = RANGE // uapi.PAGE_SIZE
ROUNDS_WANTED = 2


class Checker:
    """The host side of the workload's SYNCs: shared view right, private bytes invisible to the host but
    present in guest_memfd; asks each vCPU to stop after ``ROUNDS_WANTED`` rounds."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.hidden_checks = 0

    def __call__(self, m: Machine, gv: GuestVcpu, args: tuple[int, ...]) -> None:
        code, gpa, size, byte = args[:4]
        view = m.read_shared(gpa, size)
        if code == SYNC_CHECK_SHARED:
            if view != bytes([byte]) * size:
                self.failures.append(f"vCPU {gv.index}: shared view of {gpa:#x} is not all {byte:#x}")
            if m.read_u64(m.image.area(gv.index).data + ROUNDS) >= ROUNDS_WANTED - 1:
                m.write_u64(m.image.area(gv.index).data + STOP, 1)
        elif code == SYNC_CHECK_HIDDEN:
            self.hidden_checks += 1
            if PRIVATE_BYTE in view:
                self.failures.append(f"vCPU {gv.index}: host sees private bytes at {gpa:#x}")
            attrs = m.vm.sim.attributes  # type: ignore[union-attr]
            for page in range(gpa, gpa + size, uapi.PAGE_SIZE):
                if not attrs.is_private(page >> 12):
                    self.failures.append(f"{page:#x} not private at CHECK_HIDDEN")
                r = m.vm.handle_fault(page, False, False, True)  # type: ignore[union-attr]
                data = ctypes.string_at(r.host_ptr + (page & (r.size - 1)), 1)
                if data != bytes([PRIVATE_BYTE]):
                    self.failures.append(f"guest_memfd page {page:#x} holds {data!r}")


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("policy", list(DiscardPolicy))
def test_implicit_workload(vcpus: int, policy: DiscardPolicy) -> None:
    check = Checker()
    program = implicit_conversion_workload(Expectations.for_policy(policy), PRIVATE_ALIAS_BASE)
    with Machine(
        program,
        backend="sim",
        regions=[(GPA, 4 << 20)],
        vcpus=vcpus,
        discard_policy=policy,
        on_sync=check,
        private_access_bit=51,
        args=lambda i: (GPA + i * RANGE, RANGE),
    ) as m:
        m.run(timeout=120)
        assert check.failures == []
        rounds = [m.read_u64(m.image.area(i).data + ROUNDS) for i in range(vcpus)]
        assert rounds == [ROUNDS_WANTED] * vcpus
        assert check.hidden_checks == ROUNDS_WANTED * vcpus
        stats = m.conversions.stats
        per_vcpu = 4 * PAGES * ROUNDS_WANTED  # to-private by write, to-shared by read, to-private, to-shared
        assert stats.by_source == {"memory-fault": per_vcpu * vcpus}
        assert stats.to_private == stats.to_shared == per_vcpu * vcpus // 2
        assert m.exits.counts.get("memory_fault") == per_vcpu * vcpus and "hypercall" not in m.exits.counts
        assert stats.punched_bytes == (stats.bytes_to_shared if policy.punches_private else 0)
        assert stats.discarded_shared_bytes == (stats.bytes_to_private if policy.discards_shared else 0)
        # every round ends shared: the host sees the guest's last shared fill, no private page is left
        assert m.read_shared(GPA, RANGE * vcpus) == bytes([0x11]) * RANGE * vcpus
        assert m.vm.sim.attributes.is_private(GPA >> 12) is False  # type: ignore[union-attr]


def test_machine_private_access_bit_errors() -> None:
    program = Asm().nop()
    with pytest.raises(ValueError, match="sim-only"):
        Machine(program, backend="kvm", private_access_bit=51)
    with pytest.raises(ValueError, match="SW_PROTECTED"):
        Machine(program, backend="sim", vm_type=uapi.KVM_X86_DEFAULT_VM, private_access_bit=51)
    with pytest.raises(ValueError, match="private alias"):
        Machine(GuestImage(program), backend="sim", private_access_bit=51)
    with kvmgmem.open("sim") as system, pytest.raises(ValueError, match="honours None"):
        Machine(program, system=system, private_access_bit=51)


def test_machine_builds_the_alias_for_an_asm_program() -> None:
    with Machine(Asm().nop(), backend="sim", regions=[(GPA, 2 << 20)], private_access_bit=51) as m:
        assert m.image.private_alias == 51
        assert m.image.private_va(GPA) == PRIVATE_ALIAS_BASE + GPA


@pytest.mark.parametrize("policy", ["both", "none"])
def test_demo_uses_both_sources_on_the_sim(policy: str) -> None:
    report = run_demo(backend="sim", vcpus=2, memory=2 << 20, policy=policy, seconds=0.2)
    assert report.verified, report.leaks
    assert report.private_access_bit == 51 and report.implicit_bytes_per_vcpu == 256 << 10
    assert all(r >= 1 for r in report.rounds)
    by = report.conversions_by_source
    # --seconds is a limit: a vCPU may stop after the implicit part of a round, so count what ran
    assert report.slices_per_round == 1 and all(s >= r for s, r in zip(report.slices, report.rounds, strict=True))
    assert by["hypercall"] == 4 * sum(report.slices)
    assert all(i >= r for i, r in zip(report.implicit_rounds, report.rounds, strict=True))
    assert by["memory-fault"] == 4 * (256 << 10) // uapi.PAGE_SIZE * sum(report.implicit_rounds)
    assert report.exits["memory_fault"] == by["memory-fault"]


def test_demo_explicit_only_when_asked_or_unsupported() -> None:
    report = run_demo(backend="sim", vcpus=1, memory=1 << 20, seconds=0.1, implicit=False)
    assert report.verified and report.private_access_bit is None
    assert set(report.conversions_by_source) == {"hypercall"}
    with pytest.raises(ValueError, match="only the sim"):
        run_demo(backend="kvm", implicit=True)
