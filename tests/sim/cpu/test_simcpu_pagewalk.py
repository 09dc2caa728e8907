"""The software page walk (pure: a dict stands in for guest-physical memory)."""

from __future__ import annotations

import pytest

from kvmgmem.backends.sim.cpu.pagewalk import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    NonCanonical,
    PageFault,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu.types import FaultResult, Mmio

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63
CR0 = 0x80050033  # PG, WP, PE ...
CR3 = 0x1000


class Tables:
    """PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000; entries set per test."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {
            CR3: 0x2000 | P | RW | US,
            0x2000: 0x3000 | P | RW | US,
            0x3000: 0x4000 | P | RW | US,
        }

    def read(self, gpa: int) -> int | FaultResult:
        return self.mem.get(gpa, 0)

    def go(self, va: int, access: int = ACCESS_READ, cpl: int = 0, cr4: int = 0x620, efer: int = 0x500) -> object:
        return walk(va, access, Paging(CR0, CR3, cr4, efer, 2, cpl), self.read)


def test_4k_2m_1g_leaves() -> None:
    t = Tables()
    t.mem[0x4000 + 8 * 5] = 0x123000 | P | RW
    assert t.go(0x5ABC) == Translation(0x123ABC, 4096, True, True)
    t.mem[0x3000 + 8] = 0x4400000 | P | PS  # VA 2 MiB..4 MiB → 0x4400000, read-only
    assert t.go(0x212345) == Translation(0x4412345, 2 << 20, False, True)
    t.mem[0x2000 + 8] = 0x80000000 | P | RW | PS  # VA 1 GiB → 2 GiB
    assert t.go(0x40001234) == Translation(0x80001234, 1 << 30, True, True)


@pytest.mark.parametrize(
    ("pte", "access", "cpl", "err"),
    [
        (0, ACCESS_READ, 0, 0b00000),  # not present
        (0, ACCESS_WRITE, 3, 0b00110),
        (0x9000 | P, ACCESS_WRITE, 0, 0b00011),  # CR0.WP: supervisor write to a read-only page
        (0x9000 | P | RW, ACCESS_READ, 3, 0b00101),  # user access to a supervisor page
        (0x9000 | P | RW | US | NX, ACCESS_FETCH, 0, 0b01001),  # NX without EFER.NXE: reserved bit
    ],
)
def test_page_fault_error_codes(pte: int, access: int, cpl: int, err: int) -> None:
    t = Tables()
    t.mem[0x4000 + 8 * 9] = pte
    assert t.go(0x9000, access, cpl) == PageFault(err)


def test_nx_with_nxe_and_smep() -> None:
    t = Tables()
    t.mem[0x4000 + 8 * 9] = 0x9000 | P | RW | US | NX
    assert t.go(0x9000, ACCESS_FETCH, efer=0xD00) == PageFault(0b10001)
    res = t.go(0x9000, ACCESS_READ, efer=0xD00)
    assert isinstance(res, Translation) and not res.executable
    t.mem[0x4000 + 8 * 9] = 0x9000 | P | RW | US
    assert t.go(0x9000, ACCESS_FETCH, cr4=0x620 | (1 << 20)) == PageFault(0b10001)  # SMEP


def test_noncanonical_and_resolver_outcomes() -> None:
    t = Tables()
    assert t.go(0x0000_8000_0000_0000) == NonCanonical()
    mmio = Mmio()
    t.read = lambda gpa: mmio if gpa == 0x3000 else Tables.read(t, gpa)  # type: ignore[method-assign]
    assert t.go(0x5000) is mmio  # a page-table entry that is not plain memory
