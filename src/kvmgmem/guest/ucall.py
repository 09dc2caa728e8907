"""Ucalls, guest side: the guest writes a 64-byte struct on its stack and OUTs the struct's address.

Why a struct in memory rather than registers: one OUT carries at most 4 bytes, while a SYNC needs up to six
64-bit arguments; reading registers back costs a GET_REGS ioctl per exit. The struct lives on the current
stack (always inside the image, below 4 GiB), so the 32-bit OUT value is its full gpa and each vCPU has its
own. Layout (little endian u64s): ``cmd, nargs, args[6]``. Every emitter preserves all registers and flags
are clobbered.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmgmem.guest.asm import Asm
from kvmgmem.guest.operands import Label, Mem, Operand, Reg, dx, eax, qword, rax, rdx, rsp

UCALL_PORT = 0x1000  # the port KVM selftests use for their PIO ucalls
UCALL_SIZE = 64
MAX_ARGS = 6

SYNC, DONE, ASSERT_FAIL, PRINT, EXCEPTION = 1, 2, 3, 4, 5
CMD_NAMES = {SYNC: "SYNC", DONE: "DONE", ASSERT_FAIL: "ASSERT_FAIL", PRINT: "PRINT", EXCEPTION: "EXCEPTION"}

Arg = Operand | str  # a register, memory operand, int, or a label (its address)


def _load(a: Asm, arg: Arg, slot: int, saved: int) -> None:
    """Store ``arg`` as a u64 into ``[rsp + slot]``; rax/rdx were pushed ``saved`` bytes above the struct."""
    dst = qword[rsp + slot]
    if isinstance(arg, Reg):
        if not arg.is_gpr or arg.size != 8:
            raise ValueError(f"ucall arguments must be 64-bit registers, not {arg}")
        if arg == rsp:
            raise ValueError("rsp cannot be a ucall argument (the struct is on the stack)")
        if arg in (rax, rdx):  # already clobbered: reload the saved copy
            a.mov(rax, qword[rsp + saved + (8 if arg == rax else 0)])
            a.mov(dst, rax)
        else:
            a.mov(dst, arg)
    elif isinstance(arg, Mem):
        if arg.addr.base == rsp or arg.addr.index == rsp:
            raise ValueError("rsp-relative memory cannot be a ucall argument")
        if arg.addr.base in (rax, rdx) or arg.addr.index in (rax, rdx):
            raise ValueError("memory addressed through rax/rdx cannot be a ucall argument")
        if arg.size == 8:
            a.mov(rax, arg)
        elif arg.size in (1, 2):
            a.movzx(eax, arg)
        elif arg.size == 4:
            a.mov(eax, arg)
        else:
            raise ValueError(f"cannot pass {arg} as a ucall argument")
        a.mov(dst, rax)
    elif isinstance(arg, (Label, str)):
        a.lea(rax, arg)
        a.mov(dst, rax)
    elif isinstance(arg, int):
        value = arg & (1 << 64) - 1
        if value < 1 << 31 or value >= (1 << 64) - (1 << 31):
            a.mov(dst, value if value < 1 << 31 else value - (1 << 64))
        else:
            a.mov(rax, value)
            a.mov(dst, rax)
    else:
        raise TypeError(f"not a ucall argument: {arg!r}")


def ucall(a: Asm, cmd: int, *args: Arg, port: int = UCALL_PORT) -> Asm:
    """Emit a ucall with command ``cmd`` and up to six u64 arguments; returns when the host resumes."""
    if len(args) > MAX_ARGS:
        raise ValueError(f"a ucall takes at most {MAX_ARGS} arguments")
    a.push(rax).push(rdx).sub(rsp, UCALL_SIZE)
    a.mov(qword[rsp], cmd).mov(qword[rsp + 8], len(args))
    for i, arg in enumerate(args):
        _load(a, arg, 16 + 8 * i, UCALL_SIZE)
    a.mov(rax, rsp).mov(dx, port).out(dx, eax)
    return a.add(rsp, UCALL_SIZE).pop(rdx).pop(rax)


def sync(a: Asm, *args: Arg) -> Asm:
    """SYNC: hand the host up to six values and wait for it to resume the vCPU."""
    return ucall(a, SYNC, *args)


def done(a: Asm) -> Asm:
    """DONE, forever: a vCPU resumed after DONE reports DONE again instead of running off the end.

    (Not ``hlt``: it is privileged, so a CPL3 payload would #GP.)"""
    return _forever(a, DONE)


def _forever(a: Asm, cmd: int, *args: Arg) -> Asm:
    again = Label("again")
    a.label(again)
    ucall(a, cmd, *args)
    return a.jmp(again)


def park(a: Asm) -> Asm:
    """``hlt`` forever (CPL0 only; each resume gives the host a HltExit)."""
    here = Label("park")
    return a.label(here).hlt().jmp(here)


def print_(a: Asm, text: str | Label | Reg, length: int | Reg | None = None) -> Asm:
    """PRINT a NUL-terminated string: literal text (stored in rodata), a label, or an address register."""
    where: Arg = a.cstring(text) if isinstance(text, str) else text
    return ucall(a, PRINT, where) if length is None else ucall(a, PRINT, where, length)


def assert_fail(a: Asm, check: str, expected: Arg, actual: Arg, *extra: Arg) -> Asm:
    """Report a failed check (name, the two values, up to three extra values); resuming reports it again."""
    return _forever(a, ASSERT_FAIL, a.cstring(check), expected, actual, *extra)


def assert_cmp(a: Asm, cc: str, left: Operand, right: Operand, check: str, extra: Sequence[Arg] = ()) -> Asm:
    """``cmp left, right``; unless condition ``cc`` holds (``"e"``, ``"b"``, ...), ASSERT_FAIL(check, right,
    left). Reported as (expected=right, actual=left) — the natural reading of ``assert left == right``."""
    ok = Label("assert_ok")
    a.cmp(left, right).j(cc, ok)
    assert_fail(a, check, right, left, *extra)
    return a.label(ok)


def assert_eq(a: Asm, left: Operand, right: Operand, check: str, extra: Sequence[Arg] = ()) -> Asm:
    """ASSERT_FAIL(check, right, left) unless ``left == right``."""
    return assert_cmp(a, "e", left, right, check, extra)


__all__ = [
    "ASSERT_FAIL",
    "CMD_NAMES",
    "DONE",
    "EXCEPTION",
    "MAX_ARGS",
    "PRINT",
    "SYNC",
    "UCALL_PORT",
    "UCALL_SIZE",
    "assert_cmp",
    "assert_eq",
    "assert_fail",
    "done",
    "park",
    "print_",
    "sync",
    "ucall",
]
