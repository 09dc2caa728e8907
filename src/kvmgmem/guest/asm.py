"""A small x86-64 assembler DSL on iced-x86: labels, branch relaxation, one ``Program`` out.

Why not iced's ``BlockEncoder`` alone: it can shorten branches, but the Python binding does not say where
each instruction ended up, and guest images need label addresses (entry points, data, IDT handlers). So
layout is done here — every instruction's size is fixed by its operand kinds except jmp/jcc, which start
short and grow to near until the layout is stable — and the final bytes come from
``BlockEncoder(64, fix_branches=False)`` with every instruction's ip already at its final address.

Instruction selection is generic: ``a.add(rax, 8)`` looks up every 64-bit-mode legacy encoding of ``add``
whose operand kinds accept (rax, 8) and keeps the shortest, so any plain integer/system instruction iced
knows works without a table here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from iced_x86 import (
    BlockEncoder,
    Code,
    Encoder,
    EncodingKind,
    Instruction,
    MemoryOperand,
    Mnemonic,
    OpCodeInfo,
    OpCodeOperandKind_,
    Register,
    Register_,
)
from iced_x86 import OpCodeOperandKind as K

from kvmgmem.guest.operands import Addr, Label, Mem, Operand, Reg

LabelRef = Label | str


class AsmError(ValueError):
    """An instruction that cannot be encoded, or a label that is missing or defined twice."""


# --- encoding lookup ---------------------------------------------------------------------------------------

_REG_KINDS = {
    K.R8_REG: 1, K.R8_OR_MEM: 1, K.R8_OPCODE: 1,
    K.R16_REG: 2, K.R16_OR_MEM: 2, K.R16_OPCODE: 2, K.R16_RM: 2,
    K.R32_REG: 4, K.R32_OR_MEM: 4, K.R32_OPCODE: 4, K.R32_RM: 4,
    K.R64_REG: 8, K.R64_OR_MEM: 8, K.R64_OPCODE: 8, K.R64_RM: 8,
}  # fmt: skip
_MEM_KINDS = {K.R8_OR_MEM: 1, K.R16_OR_MEM: 2, K.R32_OR_MEM: 4, K.R64_OR_MEM: 8, K.MEM: 0}
_FIXED_REGS = {K.AL: Register.AL, K.AX: Register.AX, K.EAX: Register.EAX, K.RAX: Register.RAX,
               K.CL: Register.CL, K.DX: Register.DX}  # fmt: skip
# immediate kind -> (bits in the instruction, bits after sign extension or 0 when zero-extended/exact)
_IMM_KINDS = {
    K.IMM8: (8, 0), K.IMM16: (16, 0), K.IMM32: (32, 0), K.IMM64: (64, 0),
    K.IMM8SEX16: (8, 16), K.IMM8SEX32: (8, 32), K.IMM8SEX64: (8, 64), K.IMM32SEX64: (32, 64),
}  # fmt: skip
_BRANCH_KINDS = {K.BR64_1: 1, K.BR64_4: 4}
_SUPPORTED = set(_REG_KINDS) | set(_MEM_KINDS) | set(_FIXED_REGS) | set(_IMM_KINDS) | set(_BRANCH_KINDS)
_SUPPORTED |= {K.IMM8_CONST_1, K.CR_REG, K.DR_REG, K.SEG_REG}

_ALIASES = {"jz": "je", "jnz": "jne", "jc": "jb", "jnc": "jae", "jnae": "jb", "jnb": "jae", "jna": "jbe",
            "jnbe": "ja", "jnge": "jl", "jnl": "jge", "jng": "jle", "jnle": "jg", "sal": "shl"}  # fmt: skip


@functools.cache
def _encodings() -> dict[str, list[tuple[int, tuple[OpCodeOperandKind_, ...], int]]]:
    """mnemonic -> [(code, operand kinds, operand size)] for every plain 64-bit-mode encoding iced knows."""
    by_value = {getattr(Mnemonic, n): n.lower() for n in dir(Mnemonic) if n.isupper()}
    table: dict[str, list[tuple[int, tuple[OpCodeOperandKind_, ...], int]]] = {}
    for name in dir(Code):
        if not name.isupper():
            continue
        code = getattr(Code, name)
        info = OpCodeInfo(code)
        if not info.is_instruction or not info.mode64 or info.encoding != EncodingKind.LEGACY:
            continue
        kinds = tuple(info.op_kind(i) for i in range(info.op_count))
        if not all(k in _SUPPORTED for k in kinds):
            continue
        table.setdefault(by_value[info.mnemonic], []).append((code, kinds, info.operand_size))
    return table


def _imm_fits(kind: OpCodeOperandKind_, value: int) -> int | None:
    """The value to hand iced for this immediate kind, or None if ``value`` does not fit."""
    if kind == K.IMM8_CONST_1:
        return 1 if value == 1 else None
    bits, ext = _IMM_KINDS[kind]
    width = ext or bits
    if not -(1 << (width - 1)) <= value < (1 << width):
        return None
    value &= (1 << width) - 1
    if ext:
        low = value & ((1 << bits) - 1)
        signed = low - (1 << bits) if low >> (bits - 1) else low
        if signed & ((1 << width) - 1) != value:
            return None
        return signed
    return value


def _operand_ok(kind: OpCodeOperandKind_, op: Operand) -> bool:
    if isinstance(op, Reg):
        if kind in _FIXED_REGS:
            return op.value == _FIXED_REGS[kind]
        if kind in _REG_KINDS:
            return op.is_gpr and op.size == _REG_KINDS[kind]
        return (kind, op.kind) in ((K.CR_REG, "cr"), (K.DR_REG, "dr"), (K.SEG_REG, "seg"))
    if isinstance(op, Mem):
        if kind not in _MEM_KINDS:
            return False
        return _MEM_KINDS[kind] == 0 or op.size in (0, _MEM_KINDS[kind])
    if isinstance(op, Label):
        return kind in _BRANCH_KINDS or kind == K.IMM64
    if isinstance(op, int) and not isinstance(op, bool):
        return kind in _BRANCH_KINDS or (
            (kind in _IMM_KINDS or kind == K.IMM8_CONST_1) and _imm_fits(kind, op) is not None
        )
    return False


def _memory(m: Mem, resolve: Callable[[Label], int]) -> MemoryOperand:
    a = m.addr
    if a.label is not None:  # RIP-relative: iced takes the target address
        return MemoryOperand(Register.RIP, displ=resolve(a.label) + a.disp, displ_size=8)
    base: Register_ = a.base.value if a.base else Register.NONE
    index: Register_ = a.index.value if a.index else Register.NONE
    if base == Register.NONE and index == Register.NONE:
        return MemoryOperand(displ=a.disp, displ_size=8)  # SIB absolute, no 67 prefix (iced-x86: displ_size=8)
    return MemoryOperand(base, index, a.scale, displ=a.disp, displ_size=1 if a.disp else 0)


def _create(
    code: int, kinds: tuple[OpCodeOperandKind_, ...], ops: tuple[Operand, ...], resolve: Callable[[Label], int]
) -> Instruction:
    """Build the iced Instruction for ``code`` from DSL operands (labels resolved through ``resolve``)."""
    args: list[object] = []
    shape = ""
    for kind, op in zip(kinds, ops, strict=True):
        if isinstance(op, Reg):
            args.append(op.value)
            shape += "r"
        elif isinstance(op, Mem):
            args.append(_memory(op, resolve))
            shape += "m"
        elif kind in _BRANCH_KINDS:
            args.append(resolve(op) if isinstance(op, Label) else op)
            shape += "b"
        else:
            value = resolve(op) if isinstance(op, Label) else op
            assert isinstance(value, int)
            fitted = _imm_fits(kind, value)
            assert fitted is not None
            if kind == K.IMM64:
                args.append(fitted)
                shape += "q"
            else:
                args.append(fitted)
                shape += "s" if fitted < 0 else "u"
    make = {
        "": Instruction.create, "r": Instruction.create_reg, "m": Instruction.create_mem,
        "b": Instruction.create_branch, "u": Instruction.create_u32, "s": Instruction.create_i32,
        "rr": Instruction.create_reg_reg, "rm": Instruction.create_reg_mem, "mr": Instruction.create_mem_reg,
        "ru": Instruction.create_reg_u32, "rs": Instruction.create_reg_i32, "rq": Instruction.create_reg_u64,
        "mu": Instruction.create_mem_u32, "ms": Instruction.create_mem_i32, "ur": Instruction.create_u32_reg,
        "sr": Instruction.create_i32_reg, "rru": Instruction.create_reg_reg_u32,
        "rrs": Instruction.create_reg_reg_i32, "rmu": Instruction.create_reg_mem_u32,
        "rms": Instruction.create_reg_mem_i32, "uu": Instruction.create_u32_u32,
    }.get(shape)  # fmt: skip
    if make is None:
        raise AsmError(f"operand shape {shape!r} is not supported")
    return make(code, *args)  # type: ignore[operator]


def _encoded_size(instr: Instruction, ip: int) -> int:
    return int(Encoder(64).encode(instr, ip))


# --- program items -------------------------------------------------------------------------------------------


@dataclass
class _Item:
    """One thing laid out in the program: an instruction, data, a label or padding."""

    text: str
    codes: list[tuple[int, tuple[OpCodeOperandKind_, ...]]] = field(default_factory=list)  # candidates, preferred first
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


# --- the DSL ---------------------------------------------------------------------------------------------------


class Asm:
    """Guest code under construction. Methods append instructions and return ``self`` (so calls chain).

    Labels are ``Label`` objects (``a.new_label()``) or strings local to this ``Asm``; branches may target
    a label or an absolute address. ``assemble(base)`` lays everything out and returns a ``Program``.
    """

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._rodata: list[_Item] = []  # emitted after all code, so constants never sit in the code path
        self._named: dict[str, Label] = {}

    # labels and layout ----------------------------------------------------------------------------------

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
        self._items.append(_Item(text=f"{self._ref(label).name}:", label=self._ref(label)))
        return self

    def align(self, n: int) -> Asm:
        if n <= 0 or n & (n - 1):
            raise AsmError(f"alignment must be a power of two, not {n}")
        self._items.append(_Item(text=f"align {n}", align=n))
        return self

    def db(self, data: bytes | bytearray | Iterable[int]) -> Asm:
        """Raw data (strings, tables) — emitted with iced's declare-byte pseudo instructions."""
        blob = bytes(data)
        self._items.append(_Item(text=f"db {blob[:16]!r}{'...' if len(blob) > 16 else ''}", data=blob))
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
        self._rodata += [_Item(text=f"align {align}", align=align), _Item(text=f"{lb.name}:", label=lb)]
        self._rodata.append(_Item(text=f"db {bytes(data)[:16]!r}", data=bytes(data)))
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
        name = _ALIASES.get(mnemonic.lower().rstrip("_"), mnemonic.lower().rstrip("_"))
        resolved: tuple[Operand, ...] = tuple(self._ref(o) if isinstance(o, str) else o for o in ops)
        text = f"{name} {', '.join(map(_show, resolved))}".strip()
        # 16-bit operand-size forms (66 prefix) only when a 16-bit operand asks for them: `push 0x3002`
        # must stay a qword push even though `push imm16` is shorter.
        wants16 = any(isinstance(o, (Reg, Mem)) and o.size == 2 for o in resolved)
        candidates = [
            (code, kinds)
            for code, kinds, opsize in _encodings().get(name, [])
            if len(kinds) == len(resolved)
            and (opsize != 16 or wants16)
            and all(_operand_ok(k, o) for k, o in zip(kinds, resolved, strict=True))
        ]
        if not candidates:
            raise AsmError(f"no 64-bit encoding for `{text}`")
        is_branch = any(k in _BRANCH_KINDS for _, kinds in candidates for k in kinds)
        if is_branch:  # keep the relative forms only, short first
            candidates = sorted(
                (c for c in candidates if any(k in _BRANCH_KINDS for k in c[1])),
                key=lambda c: min(_BRANCH_KINDS.get(k, 9) for k in c[1]),
            )
        item = _Item(text=text, codes=candidates, ops=resolved, is_branch=is_branch)
        if not is_branch:  # sizes do not depend on the layout: pick the shortest now
            sized = []
            for code, kinds in candidates:
                try:
                    sized.append((_encoded_size(_create(code, kinds, resolved, lambda _: 0x1000), 0x1000), code, kinds))
                except ValueError:
                    continue
            if not sized:
                raise AsmError(f"cannot encode `{text}`")
            size, code, kinds = min(sized, key=lambda s: s[0])
            item.codes, item.size = [(code, kinds)], size
        self._items.append(item)
        return self

    def emit(self, instr: Instruction, text: str | None = None) -> Asm:
        """Append a prebuilt iced instruction without label operands (string ops, rare forms)."""
        self._items.append(_Item(text=text or str(instr), raw=instr, size=_encoded_size(instr, 0)))
        return self

    # assembling -----------------------------------------------------------------------------------------

    def assemble(self, base: int) -> Program:
        """Lay out at ``base``, relax branches, encode; raises ``AsmError`` naming the bad instruction."""
        items = self._items + self._rodata
        labels: dict[int, int] = {}

        defined = {it.label.id for it in items if it.label is not None}

        def resolve(lb: Label) -> int:
            if lb.id not in defined:
                raise AsmError(f"label {lb.name} is used but never defined")
            return labels[lb.id]

        self._relax(items, base, labels, resolve)
        out, data_ranges = self._instructions(items, resolve)
        if not out:
            return Program(
                code=b"", base=base, labels={lb.name: labels[lb.id] for lb in self._named.values() if lb.id in labels}
            )
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

    def _relax(self, items: list[_Item], base: int, labels: dict[int, int], resolve: Callable[[Label], int]) -> None:
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
                ins = self._build(it, resolve)  # an undefined label raises here, not as "out of range"
                try:
                    size = _encoded_size(ins, it.addr)
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
        self, items: list[_Item], resolve: Callable[[Label], int]
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
            ins = self._build(it, resolve)
            ins.ip = it.addr
            out.append(ins)
        return out, data_ranges

    @staticmethod
    def _build(it: _Item, resolve: Callable[[Label], int]) -> Instruction:
        if it.raw is not None:
            return it.raw
        code, kinds = it.codes[it.choice]
        try:
            return _create(code, kinds, it.ops, resolve)
        except ValueError as e:
            raise AsmError(f"cannot encode `{it.text}`: {e}") from None

    # named instructions (thin wrappers over ins(), so call sites read like assembly) ---------------------

    def mov(self, dst: Operand, src: Operand | str) -> Asm:
        return self.ins("mov", dst, src)

    def movzx(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("movzx", dst, src)

    def lea(self, dst: Reg, src: Mem | Label | str) -> Asm:
        """``lea dst, [src]``; a label gives its address RIP-relatively (position independent)."""
        target = src if isinstance(src, Mem) else Mem(0, Addr(label=self._ref(src)))
        return self.ins("lea", dst, target)

    def add(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("add", dst, src)

    def sub(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("sub", dst, src)

    def and_(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("and", dst, src)

    def or_(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("or", dst, src)

    def xor(self, dst: Operand, src: Operand) -> Asm:
        return self.ins("xor", dst, src)

    def shl(self, dst: Operand, count: Operand) -> Asm:
        return self.ins("shl", dst, count)

    def shr(self, dst: Operand, count: Operand) -> Asm:
        return self.ins("shr", dst, count)

    def inc(self, dst: Operand) -> Asm:
        return self.ins("inc", dst)

    def dec(self, dst: Operand) -> Asm:
        return self.ins("dec", dst)

    def cmp(self, a: Operand, b: Operand) -> Asm:
        return self.ins("cmp", a, b)

    def test(self, a: Operand, b: Operand) -> Asm:
        return self.ins("test", a, b)

    def push(self, src: Operand) -> Asm:
        return self.ins("push", src)

    def pop(self, dst: Operand) -> Asm:
        return self.ins("pop", dst)

    def jmp(self, target: Operand | str) -> Asm:
        return self.ins("jmp", target)

    def call(self, target: Operand | str) -> Asm:
        return self.ins("call", target)

    def ret(self) -> Asm:
        return self.ins("ret")

    def j(self, cc: str, target: Label | str | int) -> Asm:
        """Conditional jump: ``a.j("ne", loop)`` is ``jne loop``."""
        return self.ins(f"j{cc}", target)

    def je(self, t: Label | str | int) -> Asm:
        return self.j("e", t)

    def jne(self, t: Label | str | int) -> Asm:
        return self.j("ne", t)

    def jz(self, t: Label | str | int) -> Asm:
        return self.j("e", t)

    def jnz(self, t: Label | str | int) -> Asm:
        return self.j("ne", t)

    def jb(self, t: Label | str | int) -> Asm:
        return self.j("b", t)

    def jae(self, t: Label | str | int) -> Asm:
        return self.j("ae", t)

    def ja(self, t: Label | str | int) -> Asm:
        return self.j("a", t)

    def jbe(self, t: Label | str | int) -> Asm:
        return self.j("be", t)

    def out(self, port: Reg | int, src: Reg) -> Asm:
        return self.ins("out", port, src)

    def in_(self, dst: Reg, port: Reg | int) -> Asm:
        return self.ins("in", dst, port)

    def rep_stosb(self) -> Asm:
        return self.emit(Instruction.create_rep_stosb(64), "rep stosb")

    def rep_stosq(self) -> Asm:
        return self.emit(Instruction.create_rep_stosq(64), "rep stosq")

    def rep_movsb(self) -> Asm:
        return self.emit(Instruction.create_rep_movsb(64), "rep movsb")

    def repe_cmpsb(self) -> Asm:
        return self.emit(Instruction.create_repe_cmpsb(64), "repe cmpsb")

    def repe_scasb(self) -> Asm:
        return self.emit(Instruction.create_repe_scasb(64), "repe scasb")

    def repe_scasq(self) -> Asm:
        return self.emit(Instruction.create_repe_scasq(64), "repe scasq")

    def lgdt(self, src: Mem | Label | str) -> Asm:
        return self.ins("lgdt", src if isinstance(src, Mem) else Mem(0, Addr(label=self._ref(src))))

    def lidt(self, src: Mem | Label | str) -> Asm:
        return self.ins("lidt", src if isinstance(src, Mem) else Mem(0, Addr(label=self._ref(src))))

    def ltr(self, src: Reg) -> Asm:
        return self.ins("ltr", src)

    def iretq(self) -> Asm:
        return self.ins("iretq")

    def wrmsr(self) -> Asm:
        return self.ins("wrmsr")

    def rdmsr(self) -> Asm:
        return self.ins("rdmsr")

    def vmcall(self) -> Asm:
        return self.ins("vmcall")

    def hlt(self) -> Asm:
        return self.ins("hlt")

    def cpuid(self) -> Asm:
        return self.ins("cpuid")

    def pause(self) -> Asm:
        return self.ins("pause")

    def nop(self) -> Asm:
        return self.ins("nop")

    def ud2(self) -> Asm:
        return self.ins("ud2")

    def int3(self) -> Asm:
        return self.ins("int3")

    def cli(self) -> Asm:
        return self.ins("cli")

    def sti(self) -> Asm:
        return self.ins("sti")


def _show(op: Operand) -> str:
    if isinstance(op, Label):
        return op.name
    if isinstance(op, int):
        return hex(op)
    return repr(op)
