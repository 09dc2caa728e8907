"""The TLB-fill fast walk: the C extension and the pure-Python fallback agree, and both agree with the full
walk (``cpu.pagewalk.walk``) wherever they answer (elsewhere they must answer None, never something else)."""

from __future__ import annotations

import ctypes
import random

import pytest

from kvmgmem.backends.sim.cpu import fastwalk
from kvmgmem.backends.sim.cpu.pagewalk import (
    ACCESS_READ,
    ACCESS_WRITE,
    PTE_ADDR,
    Paging,
    Translation,
    walk,
)
from kvmgmem.backends.sim.cpu.uc import OFF_CR, OFF_EFER, OFF_EFLAGS, OFF_HFLAGS

PAGE = 4096
NTABLES = 24


class _Tables:
    """Random 4-level tables: NTABLES table pages at gpa (i+1)·4 KiB, entries pointing at each other or at
    data frames, with random P/RW/US/PS/NX and the private bit; every table page cached."""

    def __init__(self, rng: random.Random, c_bit: int) -> None:
        self.pages = [(ctypes.c_uint64 * 512)() for _ in range(NTABLES)]
        self.gpas = [(i + 1) * PAGE for i in range(NTABLES)]
        for page in self.pages:
            for i in range(512):
                if rng.random() < 0.3:
                    continue
                bits = rng.choice([0x7, 0x7, 0x7, 0x5, 0x3, 0x1, 0x87, 0x85, 0x6])
                if rng.random() < 0.1:
                    bits |= 1 << 63
                if c_bit and rng.random() < 0.5:
                    bits |= c_bit
                if rng.random() < 0.7:
                    frame = rng.choice(self.gpas)
                else:
                    frame = rng.randrange(1 << 20) << 21 | (rng.choice([0, 0, 0x1000, 0x2000]))
                page[i] = frame | bits
        self.host = {g: ctypes.addressof(p) for g, p in zip(self.gpas, self.pages, strict=True)}
        self.views = {g: memoryview(p).cast("B").cast("Q") for g, p in zip(self.gpas, self.pages, strict=True)}

    def read_pte(self, gpa: int) -> int:
        page = gpa & ~0xFFF
        if page not in self.host:
            raise LookupError
        return int(self.pages[self.gpas.index(page)][(gpa & 0xFFF) // 8])


def _context(cr0: int, cr3: int, cr4: int, efer: int, eflags: int, cpl: int) -> ctypes.Array[ctypes.c_uint64]:
    ctx = (ctypes.c_uint64 * 1024)()
    ctx[OFF_CR // 8], ctx[(OFF_CR + 24) // 8], ctx[(OFF_CR + 32) // 8] = cr0, cr3, cr4
    ctx[OFF_EFER // 8], ctx[OFF_EFLAGS // 8], ctx[OFF_HFLAGS // 8] = efer, eflags, cpl
    return ctx


@pytest.mark.parametrize("private_bit", [None, 51])
def test_c_and_python_walks_agree(private_bit: int | None) -> None:
    if fastwalk.walk_c is None:
        pytest.skip("the _walk C extension is not built (or KVMGMEM_NO_CEXT is set)")
    rng = random.Random(15 + (private_bit or 0))
    c_bit = 0 if private_bit is None else 1 << private_bit
    mask = PTE_ADDR & ~c_bit
    answered = 0
    for _ in range(40):
        tables = _Tables(rng, c_bit)
        cr0 = (1 << 31) | 1 | rng.choice([0, 1 << 16])
        cr4 = rng.choice([0, 1 << 21])
        efer = rng.choice([0, 1 << 11]) | (1 << 10) | (1 << 8)
        eflags = rng.choice([0, 1 << 18]) | 2
        cpl = rng.choice([0, 3])
        cr3 = rng.choice(tables.gpas) | (c_bit if rng.random() < 0.3 else 0)
        ctx = _context(cr0, cr3, cr4, efer, eflags, cpl)
        q = memoryview(ctx).cast("B").cast("Q")
        regs = Paging(cr0, cr3, cr4, efer, eflags, cpl)
        for _ in range(300):
            va = rng.randrange(1 << 48)
            if va >> 47:
                va |= 0xFFFF << 48
            write = rng.random() < 0.5
            got_c = fastwalk.walk_c(ctypes.addressof(ctx), tables.host, va, mask, c_bit, write)
            got_py = fastwalk.fast_walk_py(q, tables.views, va, mask, c_bit, write)
            assert got_c == got_py, (hex(va), write)
            if got_py is None:
                continue
            answered += 1
            full = walk(va, ACCESS_WRITE if write else ACCESS_READ, regs, tables.read_pte, private_bit)
            assert isinstance(full, Translation), (hex(va), full)
            assert (full.gpa & ~0xFFF, full.writable, full.private) == got_py
    assert answered > 50  # the random tables exercise the answering path, not only refusals
