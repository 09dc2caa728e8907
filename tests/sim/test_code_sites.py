"""Hot false landing sites are unhooked (``cpu_sites.CodeSites``): guest loops over code whose bytes look like
an IN/OUT run at full speed after ``HOT`` iterations, real IN/OUT exits stay exact, and a real IN/OUT that
ends at a retired site is reported loudly."""

from __future__ import annotations

from kvmgmem.backends.sim import SimSystem
from kvmgmem.backends.sim.cpu_sites import HOT
from kvmgmem.exits import InternalErrorExit, IoExit
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest.operands import al, dx, ecx, r13, rbp


def _cpu_sites(guest: GuestVm) -> object:
    return guest.vcpus[0].vcpu._cpu._sites  # type: ignore[attr-defined]


def test_hot_false_site_is_retired_and_exits_stay_exact(simsys: SimSystem) -> None:
    """``cmp r13, rbp`` encodes as ``4c 39 ed``-style bytes ending in 0xED (``in eax, dx``): the address after
    it is a landing site. Looping over it 2×HOT times retires that site, and the OUT after the loop still
    exits exactly (RIP at the OUT, the next run resumes after it)."""
    a = Asm()
    a.mov(ecx, 2 * HOT)
    a.label("loop")
    a.cmp(r13, rbp)
    a.dec(ecx)
    a.jnz("loop")
    a.mov(al, 0x5A).out(0x77, al)
    a.out(0x78, al)
    with GuestVm.create(simsys, GuestImage(a)) as guest:
        vcpu = guest.create_vcpu().vcpu
        exit = vcpu.run()
        assert exit == IoExit(1, 0x77, 1, 1, b"\x5a"), exit
        sites = _cpu_sites(guest)
        assert sites.retired, "the hot false landing site was not retired"  # type: ignore[attr-defined]
        assert vcpu.run() == IoExit(1, 0x78, 1, 1, b"\x5a")


def test_real_in_at_a_retired_site_is_an_emulation_failure(simsys: SimSystem) -> None:
    """A landing site that ran HOT times before the IN in front of it ever executed is retired; when that IN
    then runs, its stop lands late: KVM_RUN reports an emulation failure rather than a wrong exit."""
    a = Asm()
    a.mov(ecx, 2 * HOT)
    a.mov(dx, 0x80)
    a.jmp("site")
    a.label("the_in")
    a.in_(al, dx)  # one byte (0xEC): its landing site is "site"
    a.label("site")
    a.dec(ecx)
    a.jnz("site")
    a.test(ecx, ecx)  # ecx is 0 the first time out of the loop: run the IN once
    a.mov(ecx, 1)
    a.jmp("the_in")
    with GuestVm.create(simsys, GuestImage(a)) as guest:
        exit = guest.create_vcpu().vcpu.run()
        assert isinstance(exit, InternalErrorExit) and exit.suberror == 1, exit
