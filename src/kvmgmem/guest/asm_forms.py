"""The assembler's named instruction forms, grouped by family: thin wrappers over ``Asm.ins`` so guest code
reads like assembly (``a.mov(rax, 1).out(dx, al)``) and a typo is an ``AttributeError``, not an encoding
search.

Why mixins: each family is a short list of one-line methods; ``Asm`` (in ``asm``) inherits them all and
supplies ``ins``, ``emit`` and ``_ref``. Nothing here encodes or lays out anything.
"""

from __future__ import annotations

from typing import Self

from iced_x86 import Instruction

from kvmgmem.guest.asm_layout import LabelRef
from kvmgmem.guest.operands import Addr, Label, Mem, Operand, Reg


class _Emitter:
    """What the instruction families need from ``Asm`` (it overrides all three)."""

    def ins(self, mnemonic: str, *ops: Operand | str) -> Self:
        raise NotImplementedError

    def emit(self, instr: Instruction, text: str | None = None) -> Self:
        raise NotImplementedError

    def _ref(self, label: LabelRef) -> Label:
        raise NotImplementedError

    def _rip(self, src: Mem | LabelRef) -> Mem:
        """``src`` itself, or a RIP-relative reference to the label ``src`` (position independent)."""
        return src if isinstance(src, Mem) else Mem(0, Addr(label=self._ref(src)))


class DataMovement(_Emitter):
    """mov, movzx, lea, push, pop, and the string instructions with their rep prefixes."""

    def mov(self, dst: Operand, src: Operand | str) -> Self:
        return self.ins("mov", dst, src)

    def movzx(self, dst: Operand, src: Operand) -> Self:
        return self.ins("movzx", dst, src)

    def lea(self, dst: Reg, src: Mem | Label | str) -> Self:
        """``lea dst, [src]``; a label gives its address RIP-relatively (position independent)."""
        return self.ins("lea", dst, self._rip(src))

    def push(self, src: Operand) -> Self:
        return self.ins("push", src)

    def pop(self, dst: Operand) -> Self:
        return self.ins("pop", dst)

    def rep_stosb(self) -> Self:
        return self.emit(Instruction.create_rep_stosb(64), "rep stosb")

    def rep_stosq(self) -> Self:
        return self.emit(Instruction.create_rep_stosq(64), "rep stosq")

    def rep_movsb(self) -> Self:
        return self.emit(Instruction.create_rep_movsb(64), "rep movsb")

    def repe_cmpsb(self) -> Self:
        return self.emit(Instruction.create_repe_cmpsb(64), "repe cmpsb")

    def repe_scasb(self) -> Self:
        return self.emit(Instruction.create_repe_scasb(64), "repe scasb")

    def repe_scasq(self) -> Self:
        return self.emit(Instruction.create_repe_scasq(64), "repe scasq")


class Arithmetic(_Emitter):
    """add, sub, the bitwise operations, shifts, inc/dec, and the flag-setting compares."""

    def add(self, dst: Operand, src: Operand) -> Self:
        return self.ins("add", dst, src)

    def sub(self, dst: Operand, src: Operand) -> Self:
        return self.ins("sub", dst, src)

    def and_(self, dst: Operand, src: Operand) -> Self:
        return self.ins("and", dst, src)

    def or_(self, dst: Operand, src: Operand) -> Self:
        return self.ins("or", dst, src)

    def xor(self, dst: Operand, src: Operand) -> Self:
        return self.ins("xor", dst, src)

    def shl(self, dst: Operand, count: Operand) -> Self:
        return self.ins("shl", dst, count)

    def shr(self, dst: Operand, count: Operand) -> Self:
        return self.ins("shr", dst, count)

    def inc(self, dst: Operand) -> Self:
        return self.ins("inc", dst)

    def dec(self, dst: Operand) -> Self:
        return self.ins("dec", dst)

    def cmp(self, a: Operand, b: Operand) -> Self:
        return self.ins("cmp", a, b)

    def test(self, a: Operand, b: Operand) -> Self:
        return self.ins("test", a, b)


class ControlFlow(_Emitter):
    """jmp, call, ret and the conditional jumps (a label, a label name or an absolute address as target)."""

    def jmp(self, target: Operand | str) -> Self:
        return self.ins("jmp", target)

    def call(self, target: Operand | str) -> Self:
        return self.ins("call", target)

    def ret(self) -> Self:
        return self.ins("ret")

    def j(self, cc: str, target: Label | str | int) -> Self:
        """Conditional jump: ``a.j("ne", loop)`` is ``jne loop``."""
        return self.ins(f"j{cc}", target)

    def je(self, t: Label | str | int) -> Self:
        return self.j("e", t)

    def jne(self, t: Label | str | int) -> Self:
        return self.j("ne", t)

    def jz(self, t: Label | str | int) -> Self:
        return self.j("e", t)

    def jnz(self, t: Label | str | int) -> Self:
        return self.j("ne", t)

    def jb(self, t: Label | str | int) -> Self:
        return self.j("b", t)

    def jae(self, t: Label | str | int) -> Self:
        return self.j("ae", t)

    def ja(self, t: Label | str | int) -> Self:
        return self.j("a", t)

    def jbe(self, t: Label | str | int) -> Self:
        return self.j("be", t)


class System(_Emitter):
    """Port I/O, descriptor-table loads, MSRs, hypercalls and the one-byte control instructions."""

    def out(self, port: Reg | int, src: Reg) -> Self:
        return self.ins("out", port, src)

    def in_(self, dst: Reg, port: Reg | int) -> Self:
        return self.ins("in", dst, port)

    def lgdt(self, src: Mem | Label | str) -> Self:
        return self.ins("lgdt", self._rip(src))

    def lidt(self, src: Mem | Label | str) -> Self:
        return self.ins("lidt", self._rip(src))

    def ltr(self, src: Reg) -> Self:
        return self.ins("ltr", src)

    def iretq(self) -> Self:
        return self.ins("iretq")

    def wrmsr(self) -> Self:
        return self.ins("wrmsr")

    def rdmsr(self) -> Self:
        return self.ins("rdmsr")

    def vmcall(self) -> Self:
        return self.ins("vmcall")

    def hlt(self) -> Self:
        return self.ins("hlt")

    def cpuid(self) -> Self:
        return self.ins("cpuid")

    def pause(self) -> Self:
        return self.ins("pause")

    def nop(self) -> Self:
        return self.ins("nop")

    def ud2(self) -> Self:
        return self.ins("ud2")

    def int3(self) -> Self:
        return self.ins("int3")

    def cli(self) -> Self:
        return self.ins("cli")

    def sti(self) -> Self:
        return self.ins("sti")
