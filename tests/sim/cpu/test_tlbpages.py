"""Ranged flushes drop single pages of unicorn's TLB (``cpu/tlbpages.py``, issue 15): after a flush the
remapped page is read through its new backing while the other pages keep their TLB entries, and whatever the
record cannot vouch for (a page-table page in the range, more pages than it remembers) drops the whole TLB."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from kvmgmem.backends.sim.cpu import SimCpu
from kvmgmem.backends.sim.cpu.tlbpages import ALIASES, TRACKED
from kvmgmem.backends.sim.cpu.uc import PageFlush, new_engine
from kvmgmem.exits import IoExit
from kvmgmem.hostmem import HostMemory

from .simcpu_guest import CODE, DATA, PT, Asm, C, Guest, I, R, mem_op

OTHER = DATA + 0x1000

pytestmark = pytest.mark.skipif(
    not PageFlush(new_engine()).available,
    reason="this libunicorn does not export tlb_flush_page_x86_64 and qemu_get_cpu_x86_64: the sim flushes whole TLBs",
)


class Spy:
    """Records the page flushes and full flushes of one vCPU's engine TLB."""

    def __init__(self, cpu: SimCpu) -> None:
        self.pages: list[int] = []
        self.full = 0
        installed = cpu.tlb.installed
        real_page, real_all = installed._page_flush, installed.flush_all

        def page(vpage: int) -> None:
            self.pages.append(vpage)
            real_page(vpage)

        def everything() -> None:
            self.full += 1
            real_all()

        installed._page_flush = page  # type: ignore[assignment]
        installed.flush_all = everything  # type: ignore[method-assign]


@pytest.fixture
def reader(guest: Guest) -> Iterator[tuple[SimCpu, HostMemory]]:
    """A vCPU that reads DATA (port 0x10) and OTHER (port 0x11) in a loop, both pages in its TLB; and a
    spare page that DATA can be remapped to."""
    spare = HostMemory(4096)
    struct.pack_into("<Q", spare, 0, 0x1234)
    guest.cpuset.add_store(spare.address, 4096)
    guest.set_u64(DATA, 0x5555)
    guest.set_u64(OTHER, 0x7777)
    a = Asm().label("top")
    a(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(DATA))).out(0x10)
    a(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(OTHER))).out(0x11)
    a.branch(C.JMP_REL32_64, "top")
    guest.load(a)
    cpu = guest.cpu(CODE)
    for want in (0x5555, 0x7777):
        ex = cpu.run()
        assert isinstance(ex, IoExit) and ex.value == want
    try:
        yield cpu, spare
    finally:
        guest.cpuset.close()
        guest.cpuset.remove_store(spare.address)
        spare.close()


def _reads(cpu: SimCpu) -> list[int]:
    out = []
    for _ in range(2):
        ex = cpu.run()
        assert isinstance(ex, IoExit)
        out.append(ex.value)
    return out


def test_a_ranged_flush_drops_only_the_pages_of_its_gfns(guest: Guest, reader: tuple[SimCpu, HostMemory]) -> None:
    cpu, spare = reader
    spy = Spy(cpu)
    guest.resolver.map[DATA >> 12] = spare.address  # the zap: a new backing for DATA's gfn ...
    guest.cpuset.flush(DATA >> 12, (DATA >> 12) + 1)  # ... and its flush
    assert _reads(cpu) == [0x1234, 0x7777]  # the stale translation of DATA is gone
    assert spy.pages == [DATA] and spy.full == 0  # and nothing else left the TLB


def test_a_page_table_page_in_the_range_drops_the_whole_tlb(guest: Guest, reader: tuple[SimCpu, HostMemory]) -> None:
    cpu, _ = reader
    spy = Spy(cpu)
    guest.cpuset.flush(PT >> 12, (PT >> 12) + 1)  # every 4 KiB translation walked this table
    assert _reads(cpu) == [0x5555, 0x7777]
    assert spy.full == 1


def test_more_pages_than_remembered_drop_the_whole_tlb(guest: Guest, reader: tuple[SimCpu, HostMemory]) -> None:
    cpu, _ = reader
    installed = cpu.tlb.installed
    for gfn in range(1 << 20, (1 << 20) + TRACKED):  # fills of that many gfns (made up: none is mapped)
        installed.note(gfn << 12, gfn << 12)
    assert installed.untracked
    spy = Spy(cpu)
    guest.cpuset.flush(DATA >> 12, (DATA >> 12) + 1)
    assert _reads(cpu) == [0x5555, 0x7777]
    assert spy.full == 1 and not installed.untracked
    assert set(installed.vpages) == {CODE >> 12, DATA >> 12, OTHER >> 12}  # refilled since; the rest forgotten
    for alias in range(ALIASES + 1):  # likewise for one gfn mapped at more virtual pages than remembered
        installed.note(DATA, (alias + 1) << 30)
    assert installed.untracked
