"""Operands of the assembler DSL: registers, memory references and labels.

They exist so guest code reads like assembly (``qword[rbx + rcx * 8 + 16]``) while staying plain Python
objects that the encoder (``asm.py``) can turn into iced-x86 operands. Nothing here knows about encodings.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from iced_x86 import Register, Register_, RegisterExt

_label_ids = itertools.count(1)


class Label:
    """A position in a program, bound with ``Asm.label(l)``. Unique by identity, so library routines can
    create their own without name clashes; ``name`` is for listings and ``Program.labels``."""

    __slots__ = ("id", "name")

    def __init__(self, name: str | None = None) -> None:
        self.id = next(_label_ids)
        self.name = name or f".L{self.id}"

    def __repr__(self) -> str:
        return f"Label({self.name!r})"


@dataclass(frozen=True)
class Reg:
    """A register (wraps iced's ``Register`` value) with its width in bytes."""

    name: str
    value: Register_
    size: int

    @property
    def is_gpr(self) -> bool:
        return bool(RegisterExt.is_gpr(self.value))

    @property
    def kind(self) -> str:
        """'gpr', 'cr', 'dr', 'seg' or 'other' — what operand slots the register may fill."""
        if self.is_gpr:
            return "gpr"
        if RegisterExt.is_cr(self.value):
            return "cr"
        if RegisterExt.is_dr(self.value):
            return "dr"
        if RegisterExt.is_segment_register(self.value):
            return "seg"
        return "other"

    def __add__(self, other: object) -> Addr:
        return Addr.of(self) + other

    def __radd__(self, other: object) -> Addr:
        return Addr.of(self) + other

    def __sub__(self, other: int) -> Addr:
        return Addr.of(self) - other

    def __mul__(self, scale: int) -> Addr:
        if scale not in (1, 2, 4, 8):
            raise ValueError(f"scale must be 1, 2, 4 or 8, not {scale}")
        return Addr(index=self, scale=scale)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Addr:
    """An effective address: ``base + index*scale + disp``, or ``label + disp`` (RIP-relative)."""

    base: Reg | None = None
    index: Reg | None = None
    scale: int = 1
    disp: int = 0
    label: Label | None = None

    @staticmethod
    def of(x: object) -> Addr:
        if isinstance(x, Addr):
            return x
        if isinstance(x, Reg):
            if not x.is_gpr or x.size != 8:
                raise ValueError(f"{x} cannot address memory (use a 64-bit register)")
            return Addr(base=x)
        if isinstance(x, Label):
            return Addr(label=x)
        if isinstance(x, int) and not isinstance(x, bool):
            return Addr(disp=x)
        raise TypeError(f"not an address: {x!r}")

    def __add__(self, other: object) -> Addr:
        if isinstance(other, int) and not isinstance(other, bool):
            return Addr(self.base, self.index, self.scale, self.disp + other, self.label)
        o = Addr.of(other)
        parts = [r for r in (self.base, o.base) if r is not None]
        indexes = [(r, s) for r, s in ((self.index, self.scale), (o.index, o.scale)) if r is not None]
        if len(parts) == 2 and not indexes:
            indexes, parts = [(parts[1], 1)], parts[:1]
        labels = [lb for lb in (self.label, o.label) if lb is not None]
        if len(parts) > 1 or len(indexes) > 1 or len(labels) > 1 or (labels and (parts or indexes)):
            raise ValueError(f"cannot encode address {self} + {o}")
        index, scale = indexes[0] if indexes else (None, 1)
        return Addr(parts[0] if parts else None, index, scale, self.disp + o.disp, labels[0] if labels else None)

    __radd__ = __add__

    def __sub__(self, other: int) -> Addr:
        return self + (-other)

    def __str__(self) -> str:
        terms = [str(t) for t in (self.base, self.label and self.label.name) if t]
        if self.index is not None:
            terms.append(f"{self.index}*{self.scale}")
        if self.disp or not terms:
            terms.append(hex(self.disp))
        return "+".join(terms)


@dataclass(frozen=True)
class Mem:
    """A memory operand: an address plus the access size in bytes (0 = unsized, e.g. for ``lea``/``lgdt``)."""

    size: int
    addr: Addr

    def __repr__(self) -> str:
        names = {0: "mem", 1: "byte", 2: "word", 4: "dword", 8: "qword", 16: "xmmword"}
        return f"{names.get(self.size, self.size)}[{self.addr}]"


class _Sized:
    """``qword[rbx + 8]`` builds a ``Mem``; the subscript may be a register, an int, a label or an ``Addr``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __getitem__(self, where: object) -> Mem:
        return Mem(self.size, Addr.of(where))


byte = _Sized(1)
word = _Sized(2)
dword = _Sized(4)
qword = _Sized(8)
mem = _Sized(0)


def _reg(name: str) -> Reg:
    value: Register_ = getattr(Register, name.upper())
    return Reg(name, value, int(RegisterExt.size(value)))


rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp = (_reg(n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"))
r8, r9, r10, r11, r12, r13, r14, r15 = (_reg(f"r{i}") for i in range(8, 16))
eax, ebx, ecx, edx, esi, edi, esp, ebp = (_reg(n) for n in ("eax", "ebx", "ecx", "edx", "esi", "edi", "esp", "ebp"))
r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d = (_reg(f"r{i}d") for i in range(8, 16))
ax, bx, cx, dx, si, di, sp, bp = (_reg(n) for n in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp"))
r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w = (_reg(f"r{i}w") for i in range(8, 16))
al, bl, cl, dl, sil, dil, spl, bpl = (_reg(n) for n in ("al", "bl", "cl", "dl", "sil", "dil", "spl", "bpl"))
r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b = (_reg(f"r{i}l") for i in range(8, 16))
cr0, cr2, cr3, cr4, cr8 = (_reg(f"cr{i}") for i in (0, 2, 3, 4, 8))
cs, ds, es, fs, gs, ss = (_reg(n) for n in ("cs", "ds", "es", "fs", "gs", "ss"))

#: The 64-bit general purpose registers in encoding order.
GPR64 = (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15)

Operand = Reg | Mem | Label | int
