"""A small x86-64 assembler DSL on iced-x86: labels, branch relaxation, one ``Program`` out.

``Asm`` collects items (instructions, labels, data, alignment); three modules do the rest, one job each:

- ``asm_encoding``: instruction selection. ``a.add(rax, 8)`` looks up every 64-bit-mode legacy encoding of
  ``add`` whose operand kinds accept (rax, 8) and keeps the shortest, so any plain integer/system instruction
  iced knows works without a table here.
- ``asm_layout``: addresses, branch relaxation (jmp/jcc start short and grow to near until the layout is
  stable) and the final bytes from iced's ``BlockEncoder``; ``Program`` is its result.
- ``asm_forms``: the named instruction methods (``mov``, ``jnz``, ``lgdt``...) grouped by family, inherited
  by ``Asm``.
"""

from __future__ import annotations

from collections.abc import Iterable

from iced_x86 import Instruction

from kvmgmem.guest.asm_encoding import MNEMONIC_ALIASES, AsmError, encoded_size, select
from kvmgmem.guest.asm_forms import Arithmetic, ControlFlow, DataMovement, System
from kvmgmem.guest.asm_layout import Item, LabelRef, Program, assemble
from kvmgmem.guest.operands import Label, Operand

__all__ = ["Asm", "AsmError", "LabelRef", "Program"]


class Asm(DataMovement, Arithmetic, ControlFlow, System):
    """Guest code under construction. Methods append instructions and return ``self`` (so calls chain).

    Labels are ``Label`` objects (``a.new_label()``) or strings local to this ``Asm``; branches may target
    a label or an absolute address. ``assemble(base)`` lays everything out and returns a ``Program``.
    """

    def __init__(self) -> None:
        self._items: list[Item] = []
        self._rodata: list[Item] = []  # emitted after all code, so constants never sit in the code path
        self._named: dict[str, Label] = {}

    # labels and data ------------------------------------------------------------------------------------

    def new_label(self, name: str | None = None) -> Label:
        return Label(name)

    def _ref(self, label: LabelRef) -> Label:
        if isinstance(label, Label):
            return label
        if label not in self._named:
            self._named[label] = Label(label)
        return self._named[label]

    def label(self, label: LabelRef) -> Asm:
        """Bind ``label`` to the current position."""
        self._items.append(Item(text=f"{self._ref(label).name}:", label=self._ref(label)))
        return self

    def align(self, n: int) -> Asm:
        if n <= 0 or n & (n - 1):
            raise AsmError(f"alignment must be a power of two, not {n}")
        self._items.append(Item(text=f"align {n}", align=n))
        return self

    def db(self, data: bytes | bytearray | Iterable[int]) -> Asm:
        """Raw data (strings, tables) — emitted with iced's declare-byte pseudo instructions."""
        blob = bytes(data)
        self._items.append(Item(text=f"db {blob[:16]!r}{'...' if len(blob) > 16 else ''}", data=blob))
        return self

    def dq(self, *values: int) -> Asm:
        return self.db(b"".join((v & (1 << 64) - 1).to_bytes(8, "little") for v in values))

    def string(self, text: str, label: LabelRef | None = None) -> Label:
        """A NUL-terminated string at a (new or given) label; returns the label."""
        lb = self._ref(label) if label is not None else Label(f".str{len(self._items)}")
        self.label(lb).db(text.encode() + b"\0")
        return lb

    def rodata(self, data: bytes, name: str | None = None, align: int = 8) -> Label:
        """Constant data placed after all code (the listing's tail); returns its label."""
        lb = Label(name)
        self._rodata += [Item(text=f"align {align}", align=align), Item(text=f"{lb.name}:", label=lb)]
        self._rodata.append(Item(text=f"db {bytes(data)[:16]!r}", data=bytes(data)))
        return lb

    def cstring(self, text: str, name: str | None = None) -> Label:
        """A NUL-terminated string in the rodata section (ucall check names, PRINT texts)."""
        return self.rodata(text.encode() + b"\0", name, align=1)

    def include(self, other: Asm) -> Asm:
        """Append another fragment (code here, its rodata to this program's rodata; labels stay its own)."""
        self._items.extend(other._items)
        self._rodata.extend(other._rodata)
        return self

    # instructions ---------------------------------------------------------------------------------------

    def ins(self, mnemonic: str, *ops: Operand | str) -> Asm:
        """Append ``mnemonic ops...`` using the shortest encoding iced offers for these operands.

        A string operand is a label of this ``Asm``; a label or int as the operand of a jmp/jcc/call is a
        branch target; a label elsewhere is its address as a 64-bit immediate (``mov rax, label``).
        """
        name = MNEMONIC_ALIASES.get(mnemonic.lower().rstrip("_"), mnemonic.lower().rstrip("_"))
        resolved: tuple[Operand, ...] = tuple(self._ref(o) if isinstance(o, str) else o for o in ops)
        text = f"{name} {', '.join(map(_show, resolved))}".strip()
        codes, size, is_branch = select(name, resolved, text)
        self._items.append(Item(text=text, codes=codes, ops=resolved, size=size, is_branch=is_branch))
        return self

    def emit(self, instr: Instruction, text: str | None = None) -> Asm:
        """Append a prebuilt iced instruction without label operands (string ops, rare forms)."""
        self._items.append(Item(text=text or str(instr), raw=instr, size=encoded_size(instr, 0)))
        return self

    def assemble(self, base: int) -> Program:
        """Lay out at ``base``, relax branches, encode; raises ``AsmError`` naming the bad instruction."""
        return assemble(self._items + self._rodata, self._named.values(), base)


def _show(op: Operand) -> str:
    if isinstance(op, Label):
        return op.name
    if isinstance(op, int):
        return hex(op)
    return repr(op)
