"""The private access bit without a vCPU: the page walk, the profile option, the alias page tables."""

from __future__ import annotations

import struct

import pytest

import kvmgmem
from kvmgmem.backends.sim import PROFILES
from kvmgmem.backends.sim.cpu_pagewalk import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    PageFault,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu_types import FaultResult
from kvmgmem.guest import paging
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.image import PRIVATE_ALIAS_BASE, GuestImage

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


def test_profile_option_default_off_and_validated() -> None:
    with kvmgmem.open("sim") as system:
        assert system.profile == PROFILES["6.18"]  # type: ignore[attr-defined]
        assert system.profile.private_access_bit is None  # type: ignore[attr-defined]
        assert system.private_access_bit is None  # type: ignore[attr-defined]
    with kvmgmem.open("sim", private_access_bit=51) as system:
        assert system.private_access_bit == 51  # type: ignore[attr-defined]
        assert system.profile.name == "6.18"  # type: ignore[attr-defined]
    for bad in (True, 11, 52, 63, "51", 51.0):
        with pytest.raises(ValueError, match="private_access_bit"):
            kvmgmem.open("sim", private_access_bit=bad)


def test_option_is_not_a_kernel_cap() -> None:
    """Capabilities stay exactly the default profile's."""
    from kvmgmem import uapi

    caps = [getattr(uapi, n) for n in dir(uapi) if n.startswith("KVM_CAP_")]
    with kvmgmem.open("sim") as plain, kvmgmem.open("sim", private_access_bit=51) as cbit:
        assert [plain.check_extension(c) for c in caps] == [cbit.check_extension(c) for c in caps]


def _q(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


@pytest.mark.parametrize("page_size", [paging.PAGE_4K, paging.PAGE_2M, paging.PAGE_1G])
def test_alias_tables(page_size: int) -> None:
    reach = 4 * paging.GiB
    base = 0x100000
    plain = paging.build(base, reach, page_size)
    t = paging.build(base, reach, page_size, alias_base=PRIVATE_ALIAS_BASE, alias_bits=C51)
    assert t.size == plain.size + paging.alias_table_bytes(reach, page_size)
    slot = PRIVATE_ALIAS_BASE >> 39
    # identity tables unchanged; the PML4 differs only in the alias slot
    assert t.data[4096 : plain.size] == plain.data[4096:]
    assert t.data[: 8 * slot] == plain.data[: 8 * slot]
    assert t.data[8 * slot + 8 : 4096] == plain.data[8 * slot + 8 : 4096]
    assert _q(t.data, 8 * slot) & paging.PTE_P and not _q(t.data, 8 * slot) & C51

    # walk both mappings with the pure walker (tables read from the blob): same frame, the alias is private
    def read(gpa: int) -> int:
        return _q(t.data, gpa - base)

    regs = Paging(CR0, t.cr3, 0x620, 0x500, 2, 0)
    for pa in (0, 0x1234, 3 * paging.GiB + 0x5678):
        ident = walk(pa, ACCESS_WRITE, regs, read, 51)
        alias = walk(PRIVATE_ALIAS_BASE + pa, ACCESS_WRITE, regs, read, 51)
        assert isinstance(ident, Translation) and isinstance(alias, Translation)
        assert (ident.gpa, ident.private) == (pa, False)
        assert (alias.gpa, alias.private) == (pa, True)


def test_alias_arguments_checked() -> None:
    with pytest.raises(ValueError, match="512 GiB aligned"):
        paging.build(0x100000, paging.GiB, alias_base=PRIVATE_ALIAS_BASE + 4096, alias_bits=C51)
    with pytest.raises(ValueError, match="512 GiB aligned"):
        paging.build(0x100000, 1 << 40, alias_base=1 << 39, alias_bits=C51)  # overlaps the identity map
    with pytest.raises(ValueError, match="above the mapped"):
        paging.build(0x100000, 1 << 40, alias_base=PRIVATE_ALIAS_BASE, alias_bits=1 << 30)


def test_image_private_va() -> None:
    img = GuestImage(Asm().nop(), private_alias=51, reach=8 * paging.GiB)
    assert img.private_va(4 << 30) == PRIVATE_ALIAS_BASE + (4 << 30)
    assert img.tables.alias_bits == C51
    with pytest.raises(ValueError, match="reach"):
        img.private_va(8 * paging.GiB)
    plain = GuestImage(Asm().nop(), reach=8 * paging.GiB)
    with pytest.raises(ValueError, match="no private alias"):
        plain.private_va(0)
    assert plain.tables.alias_base is None and plain.private_alias is None
    with pytest.raises(ValueError, match="private_alias"):
        GuestImage(Asm().nop(), private_alias=True)
