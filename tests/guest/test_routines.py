"""``routines.fill``/``verify`` with every operand form: qword loops plus byte tails must cover exactly the
range (no byte before or after), and verify must name the exact first differing byte (issue 15)."""

from __future__ import annotations

import pytest

from kvmgmem.guest import Asm, GuestAssertionError, GuestImage
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.guest.operands import Reg, rcx, rdx, rsi
from kvmgmem.hostmem import HostMemory

from ._util import MakeGuest

GPA, SIZE = 1 << 30, 64 << 10

# (start offset, length, first bad byte offset within the range or None, how operands are passed)
CASES = [
    (0, 4096, 4095, "int"),
    (3, 4099, 4098, "int"),  # unaligned start, byte tail; the mismatch sits in the tail
    (8, 7, 2, "int"),  # tail only
    (5, 20_001, 9_000, "reg"),  # start and length in registers (the workload's form)
    (0, 16, 9, "reg"),
    (1, 3, None, "reg"),
    (0, 0, None, "reg"),
    (6, 1_000, 517, "rcx"),  # length in rcx: the byte-loop fallback
]


def _program(start: int, length: int, how: str) -> Asm:
    a = Asm()
    s: int | Reg = GPA + start
    n: int | Reg = length
    if how == "reg":
        a.mov(rsi, GPA + start).mov(rdx, length)
        s, n = rsi, rdx
    elif how == "rcx":
        a.mov(rcx, length)
        n = rcx
    R.fill(a, s, n, 0x5A)
    U.sync(a)
    if how == "reg":
        a.mov(rsi, GPA + start).mov(rdx, length)
    elif how == "rcx":
        a.mov(rcx, length)
    R.verify(a, s, n, 0x5A, "after host write")
    U.done(a)
    return a


@pytest.mark.parametrize(("start", "length", "bad", "how"), CASES)
def test_fill_and_verify_cover_exactly_the_range(
    make_guest: MakeGuest, start: int, length: int, bad: int | None, how: str
) -> None:
    g = make_guest(GuestImage(_program(start, length, how), user=True))
    with HostMemory(SIZE) as mem:
        try:
            g.add_memory(1, GPA, mem)
            v = g.vcpus[0]
            assert v.expect_sync() == ()
            assert mem[start : start + length] == b"\x5a" * length
            assert not any(mem[:start]) and not any(mem[start + length :])
            if bad is None:
                v.run_to_done()
                return
            mem[start + bad] = 0x11
            if bad + 1 < length:
                mem[start + length - 1] = 0x22  # a later mismatch must not be the one reported
            with pytest.raises(GuestAssertionError, match="expected 0x5a, got 0x11") as info:
                v.run()
            assert info.value.extra == (GPA + start + bad,)
        finally:
            g.close()
