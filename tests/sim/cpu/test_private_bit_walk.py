"""The private access bit in the sim CPU's page walk (no vCPU): only the leaf entry's bit marks an access
private, the bit is stripped from table addresses, and without the option it is an address bit."""

from __future__ import annotations

import pytest

from kvmgmem.backends.sim.cpu.pagewalk import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    PageFault,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu.types import FaultResult

P, RW, PS = 1, 2, 0x80
C51 = 1 << 51
CR0 = 0x80050033
CR3 = 0x1000


class Tables:
    """PML4 0x1000 → PDPT 0x2000 → PD 0x3000 → PT 0x4000 (entries per test)."""

    def __init__(self, c_in_tables: int = 0) -> None:
        self.mem: dict[int, int] = {CR3: 0x2000 | c_in_tables | P | RW, 0x2000: 0x3000 | c_in_tables | P | RW,
                                    0x3000: 0x4000 | c_in_tables | P | RW}  # fmt: skip
        self.reads: list[int] = []

    def read(self, gpa: int) -> int | FaultResult:
        self.reads.append(gpa)
        return self.mem.get(gpa, 0)

    def go(self, va: int, access: int = ACCESS_READ, bit: int | None = 51) -> object:
        return walk(va, access, Paging(CR0, CR3, 0x620, 0x500, 2, 0), self.read, bit)


@pytest.mark.parametrize("access", [ACCESS_READ, ACCESS_WRITE, ACCESS_FETCH])
def test_leaf_bit_marks_private_and_leaves_the_address(access: int) -> None:
    t = Tables()
    t.mem[0x4000 + 8 * 5] = C51 | 0x123000 | P | RW
    t.mem[0x4000 + 8 * 6] = 0x124000 | P | RW
    assert t.go(0x5ABC, access) == Translation(0x123ABC, 4096, True, True, private=True)
    assert t.go(0x6ABC, access) == Translation(0x124ABC, 4096, True, True, private=False)


def test_huge_leaves_and_other_bit_positions() -> None:
    t = Tables()
    t.mem[0x3000 + 8] = C51 | 0x4400000 | P | RW | PS  # 2 MiB leaf: no reserved-bit fault for the C-bit
    assert t.go(0x212345) == Translation(0x4412345, 2 << 20, True, True, private=True)
    t.mem[0x2000 + 8] = (1 << 47) | 0x80000000 | P | RW | PS  # 1 GiB leaf, C-bit 47
    assert t.go(0x40001234, bit=47) == Translation(0x80001234, 1 << 30, True, True, private=True)
    assert t.go(0x40001234, bit=51) == Translation((1 << 47) | 0x80001234, 1 << 30, True, True, private=False)


def test_bit_is_stripped_from_table_addresses_but_only_the_leaf_decides() -> None:
    t = Tables(c_in_tables=C51)  # an SEV guest sets the C-bit in its non-leaf entries too
    t.mem[0x4000 + 8 * 5] = 0x123000 | P | RW
    assert t.go(0x5ABC) == Translation(0x123ABC, 4096, True, True, private=False)
    assert all(not r & C51 for r in t.reads), [hex(r) for r in t.reads]


def test_without_the_option_the_bit_is_an_address_bit() -> None:
    """``private_bit=None`` (every default profile): exactly the old walk — bit 51 is part of the gpa."""
    t = Tables()
    t.mem[0x4000 + 8 * 5] = C51 | 0x123000 | P | RW
    res = t.go(0x5ABC, bit=None)
    assert res == Translation(C51 | 0x123ABC, 4096, True, True)
    assert isinstance(res, Translation) and res.private is None
    t2 = Tables(c_in_tables=C51)  # the C-bit in a table pointer is then part of the table's address
    t2.mem[C51 | 0x2000] = 0
    assert isinstance(t2.go(0x5ABC, bit=None), PageFault)
    assert t2.reads == [CR3, C51 | 0x2000]
