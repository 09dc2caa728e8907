"""The guest side of the private access bit: alias page tables (``paging.build(alias_base=...)``) and
``GuestImage.private_va``, walked with the sim CPU's pure page walker."""

from __future__ import annotations

import struct

import pytest

from kvmgmem.backends.sim.cpu.pagewalk import ACCESS_WRITE, Paging, Translation, walk
from kvmgmem.guest import paging
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.image import PRIVATE_ALIAS_BASE, GuestImage

C51 = 1 << 51
CR0 = 0x80050033


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
