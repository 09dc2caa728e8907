"""Layout for the assembler: addresses for every item, branch relaxation, and the final bytes.

Why not iced's ``BlockEncoder`` alone: it can shorten branches, but the Python binding does not say where
each instruction ended up, and guest images need label addresses (entry points, data, IDT handlers). So
layout is done here — every instruction's size is fixed by its operand kinds except jmp/jcc, which start
short and grow to near until the layout is stable — and the final bytes come from
``BlockEncoder(64, fix_branches=False)`` with every instruction's ip already at its final address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from iced_x86 import BlockEncoder, Instruction

from kvmgmem.guest.asm_encoding import AsmError, Candidate, create, encoded_size
from kvmgmem.guest.operands import Label, Operand

LabelRef = Label | str


@dataclass
class Item:
    """One thing laid out in the program: an instruction, data, a label or padding."""

    text: str
    codes: list[Candidate] = field(default_factory=list)  # candidates, preferred first
    ops: tuple[Operand, ...] = ()
    raw: Instruction | None = None  # prebuilt (string instructions)
    data: bytes = b""
    label: Label | None = None
    align: int = 0
    choice: int = 0
    size: int = 0
    addr: int = 0
    is_branch: bool = False

    def length(self, addr: int) -> int:
        """Bytes this item takes when it starts at ``addr`` (padding depends on where it starts)."""
        if self.align:
            return -addr % self.align
        return self.size


@dataclass(frozen=True)
class Program:
    """Assembled guest code: bytes meant to sit at ``base``, and where each named label ended up."""

    code: bytes
    base: int
    labels: dict[str, int]
    data_ranges: tuple[tuple[int, int], ...] = ()

    @property
    def end(self) -> int:
        return self.base + len(self.code)

    def address(self, label: LabelRef) -> int:
        name = label.name if isinstance(label, Label) else label
        if name not in self.labels:
            raise AsmError(f"no unique label {name!r} in this program")
        return self.labels[name]

    def disassemble(self) -> str:
        """An Intel-syntax listing (addresses, bytes, labels) — for debugging a guest that misbehaves."""
        from kvmgmem.guest.disasm import disassemble

        return disassemble(self.code, self.base, labels=self.labels, data_ranges=self.data_ranges)


def assemble(items: list[Item], named: Iterable[Label], base: int) -> Program:
    """Lay ``items`` out at ``base``, relax branches, encode; raises ``AsmError`` naming the bad instruction.

    ``named`` are the labels the program was built with by name: the only ones an empty program reports.
    """
    labels: dict[int, int] = {}
    defined = {it.label.id for it in items if it.label is not None}

    def resolve(lb: Label) -> int:
        if lb.id not in defined:
            raise AsmError(f"label {lb.name} is used but never defined")
        return labels[lb.id]

    _relax(items, base, labels, resolve)
    out, data_ranges = _instructions(items, resolve)
    if not out:
        return Program(code=b"", base=base, labels={lb.name: labels[lb.id] for lb in named if lb.id in labels})
    encoder = BlockEncoder(64, False)
    encoder.add_many(out)
    try:
        code = encoder.encode(base)
    except ValueError as e:
        raise AsmError(f"iced could not encode the block: {e}") from None
    expected = (items[-1].addr + items[-1].length(items[-1].addr) - base) if items else 0
    if len(code) != expected:
        raise AsmError(f"layout mismatch: laid out {expected} bytes, iced produced {len(code)}")
    names: dict[str, int] = {}
    dupes: set[str] = set()
    for it in items:
        if it.label is not None:
            if it.label.name in names:
                dupes.add(it.label.name)
            names[it.label.name] = labels[it.label.id]
    return Program(
        code=bytes(code),
        base=base,
        labels={k: v for k, v in names.items() if k not in dupes},
        data_ranges=tuple(data_ranges),
    )


def _relax(items: list[Item], base: int, labels: dict[int, int], resolve: Callable[[Label], int]) -> None:
    """Lay ``items`` out from ``base`` (filling ``labels``), growing short branches that do not reach into
    near ones until nothing changes: a branch never shrinks back, so the loop terminates."""
    for _ in range(64):
        labels.clear()
        addr = base
        for it in items:
            it.addr = addr
            if it.label is not None:
                if it.label.id in labels:
                    raise AsmError(f"label {it.label.name} defined twice")
                labels[it.label.id] = addr
            if it.data:
                it.size = len(it.data)
            addr += it.length(addr)
        changed = False
        for it in items:
            if not it.is_branch:
                continue
            ins = _build(it, resolve)  # an undefined label raises here, not as "out of range"
            try:
                size = encoded_size(ins, it.addr)
            except ValueError:
                if it.choice + 1 >= len(it.codes):
                    raise AsmError(f"branch out of range: `{it.text}`") from None
                it.choice += 1  # short -> near
                changed = True
                continue
            if size != it.size:
                it.size, changed = size, True
        if not changed:
            return
    raise AsmError("branch layout did not converge")


def _instructions(
    items: list[Item], resolve: Callable[[Label], int]
) -> tuple[list[Instruction], list[tuple[int, int]]]:
    """The laid-out items as iced instructions (data and alignment as declare-byte pieces of 16), and the
    address ranges that hold data."""
    out = []
    data_ranges = []
    for it in items:
        if it.label is not None or (it.align == 0 and not it.data and not it.codes and it.raw is None):
            continue
        if it.align or it.data:
            blob = it.data if it.data else bytes(it.length(it.addr))
            if it.data:
                data_ranges.append((it.addr, it.addr + len(blob)))
            for off in range(0, len(blob), 16):
                piece = Instruction.create_declare_byte(blob[off : off + 16])
                piece.ip = it.addr + off
                out.append(piece)
            continue
        ins = _build(it, resolve)
        ins.ip = it.addr
        out.append(ins)
    return out, data_ranges


def _build(it: Item, resolve: Callable[[Label], int]) -> Instruction:
    if it.raw is not None:
        return it.raw
    code, kinds = it.codes[it.choice]
    try:
        return create(code, kinds, it.ops, resolve)
    except ValueError as e:
        raise AsmError(f"cannot encode `{it.text}`: {e}") from None
