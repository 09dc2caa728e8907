"""Instruction selection for the assembler: which iced-x86 encodings accept a DSL operand list, and the iced
``Instruction`` for one of them.

Why a module of its own: this is the only part of the assembler that knows iced's operand kinds. Selection is
generic — every 64-bit-mode legacy encoding of a mnemonic whose operand kinds accept the operands is a
candidate, and the shortest wins — so any plain integer/system instruction iced knows works without a table
of instruction forms here. Layout (``asm_layout``) and the DSL (``asm``) only see codes and sizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from iced_x86 import (
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

from kvmgmem.guest.operands import Label, Mem, Operand, Reg


class AsmError(ValueError):
    """An instruction that cannot be encoded, or a label that is missing or defined twice."""


#: One candidate encoding: iced's ``Code`` value and its operand kinds.
Candidate = tuple[int, tuple[OpCodeOperandKind_, ...]]

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
BRANCH_KINDS = {K.BR64_1: 1, K.BR64_4: 4}
_SUPPORTED = set(_REG_KINDS) | set(_MEM_KINDS) | set(_FIXED_REGS) | set(_IMM_KINDS) | set(BRANCH_KINDS)
_SUPPORTED |= {K.IMM8_CONST_1, K.CR_REG, K.DR_REG, K.SEG_REG}

MNEMONIC_ALIASES = {"jz": "je", "jnz": "jne", "jc": "jb", "jnc": "jae", "jnae": "jb", "jnb": "jae", "jna": "jbe",
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
        return kind in BRANCH_KINDS or kind == K.IMM64
    if isinstance(op, int) and not isinstance(op, bool):
        return kind in BRANCH_KINDS or (
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


def create(
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
        elif kind in BRANCH_KINDS:
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


def encoded_size(instr: Instruction, ip: int) -> int:
    """Bytes ``instr`` takes at ``ip`` (raises ``ValueError`` when it cannot be encoded there)."""
    return int(Encoder(64).encode(instr, ip))


def select(name: str, ops: tuple[Operand, ...], text: str) -> tuple[list[Candidate], int, bool]:
    """The encodings of ``name ops`` to lay out: ``(candidates, size, is_branch)``.

    A jmp/jcc/call to a target keeps its relative forms, short first, with size 0: their size depends on the
    layout. Anything else gets its one shortest encoding and that size now. ``text`` names the instruction in
    the ``AsmError``.
    """
    # 16-bit operand-size forms (66 prefix) only when a 16-bit operand asks for them: `push 0x3002`
    # must stay a qword push even though `push imm16` is shorter.
    wants16 = any(isinstance(o, (Reg, Mem)) and o.size == 2 for o in ops)
    candidates = [
        (code, kinds)
        for code, kinds, opsize in _encodings().get(name, [])
        if len(kinds) == len(ops)
        and (opsize != 16 or wants16)
        and all(_operand_ok(k, o) for k, o in zip(kinds, ops, strict=True))
    ]
    if not candidates:
        raise AsmError(f"no 64-bit encoding for `{text}`")
    if any(k in BRANCH_KINDS for _, kinds in candidates for k in kinds):  # keep the relative forms, short first
        branches = sorted(
            (c for c in candidates if any(k in BRANCH_KINDS for k in c[1])),
            key=lambda c: min(BRANCH_KINDS.get(k, 9) for k in c[1]),
        )
        return branches, 0, True
    sized = []
    for code, kinds in candidates:
        try:
            sized.append((encoded_size(create(code, kinds, ops, lambda _: 0x1000), 0x1000), code, kinds))
        except ValueError:
            continue
    if not sized:
        raise AsmError(f"cannot encode `{text}`")
    size, code, kinds = min(sized, key=lambda s: s[0])
    return [(code, kinds)], size, False
