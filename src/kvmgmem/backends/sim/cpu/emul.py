"""The small instruction emulator behind MMIO exits (KVM's x86 emulator, reduced to plain moves).

When a guest access lands on a gpa no memslot covers, KVM decodes the instruction, exits with
KVM_EXIT_MMIO (phys_addr, len, data for a store) and, on the next KVM_RUN, completes it: a load takes
``kvm_run.mmio.data`` into the destination register, and RIP moves past the instruction. We decode with
iced-x86 and support the moves guests use for device registers: ``mov`` to/from memory (register or
immediate source), ``movzx``, ``movsx``, ``movsxd``. Anything else is an emulation failure
(``InternalErrorExit(suberror=1)``, as KVM reports when its emulator gives up). The same decoder computes the
exact linear address of each memory operand, which the #PF path needs for CR2 (unicorn's TLB-fill hook only
sees the page).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import iced_x86 as ix
from unicorn.x86_const import UC_X86_REG_FS_BASE, UC_X86_REG_GS_BASE

from kvmgmem.backends.sim.cpu.regs import GPR_ORDER
from kvmgmem.uapi import MASK64

#: iced 64-bit GPR → unicorn register id (the sixteen GPRs of the kvm_regs table, which also holds rip and rflags)
UC_GPR: dict[ix.Register_, int] = {
    getattr(ix.Register, name.upper()): reg for name, reg in GPR_ORDER if name not in ("rip", "rflags")
}
_HIGH_BYTE = {ix.Register.AH, ix.Register.BH, ix.Register.CH, ix.Register.DH}

RegRead = Callable[[int], int]  # unicorn register id -> value


def decode(code: bytes, rip: int) -> ix.Instruction | None:
    insn = ix.Decoder(64, code, ip=rip).decode()
    return None if insn.code == ix.Code.INVALID else insn


def gpr_value(reg: ix.Register_, read: RegRead) -> int:
    """Value of any iced GPR (8/16/32/64-bit view) from unicorn registers."""
    full = ix.RegisterExt.full_register(reg)
    value = read(UC_GPR[full])
    if reg in _HIGH_BYTE:
        return (value >> 8) & 0xFF
    size = ix.RegisterExt.size(reg)
    return value & ((1 << (8 * size)) - 1)


def merge_gpr(reg: ix.Register_, old_full: int, value: int) -> int:
    """The new 64-bit register contents after writing ``value`` to the ``reg`` view (x86 merge rules)."""
    if reg in _HIGH_BYTE:
        return (old_full & ~0xFF00) | ((value & 0xFF) << 8)
    size = ix.RegisterExt.size(reg)
    if size == 8:
        return value & MASK64
    if size == 4:
        return value & 0xFFFFFFFF  # 32-bit writes zero-extend
    mask = (1 << (8 * size)) - 1
    return (old_full & ~mask) | (value & mask)


def _reg_or_zero(reg: ix.Register_, read: RegRead) -> int:
    if reg == ix.Register.NONE:
        return 0
    if reg in (ix.Register.FS, ix.Register.GS):
        return read(UC_X86_REG_FS_BASE if reg == ix.Register.FS else UC_X86_REG_GS_BASE)
    if ix.RegisterExt.is_segment_register(reg):
        return 0  # flat in 64-bit mode
    return gpr_value(reg, read)


def memory_operands(insn: ix.Instruction, read: RegRead) -> list[tuple[int, int, bool]]:
    """(linear address, size, is_write) of every memory access of ``insn``, implicit stack ones included."""
    result = []
    for mem in ix.InstructionInfoFactory().info(insn).used_memory():
        if mem.base in (ix.Register.RIP, ix.Register.EIP):
            addr = mem.displacement
        else:
            addr = _reg_or_zero(mem.base, read) + _reg_or_zero(mem.index, read) * mem.scale + mem.displacement
        addr = (addr + _reg_or_zero(mem.segment, read)) & MASK64
        size = ix.MemorySizeExt.size(mem.memory_size)
        write = mem.access in (ix.OpAccess.WRITE, ix.OpAccess.READ_WRITE, ix.OpAccess.COND_WRITE)
        result.append((addr, size, write))
    return result


@dataclass(frozen=True)
class MmioAccess:
    """One emulated MMIO access: what the exit reports, and how to finish the instruction."""

    va: int
    length: int
    is_write: bool
    data: bytes  # store payload; empty for loads
    dest: ix.Register_  # iced register receiving a load (Register.NONE for stores)
    sign_extend: bool
    next_rip: int

    def load_result(self, old_full: int, data: bytes) -> int:
        """The destination register's new 64-bit value once the VMM supplied ``data``."""
        raw = int.from_bytes(data[: self.length].ljust(self.length, b"\0"), "little")
        if self.sign_extend and raw >> (8 * self.length - 1):
            raw -= 1 << (8 * self.length)
        return merge_gpr(self.dest, old_full, raw & MASK64)


_LOADS = {ix.Mnemonic.MOV: False, ix.Mnemonic.MOVZX: False, ix.Mnemonic.MOVSX: True, ix.Mnemonic.MOVSXD: True}


def decode_mmio(insn: ix.Instruction, read: RegRead) -> MmioAccess | None:
    """The MMIO access ``insn`` performs, or None if the emulator does not handle it."""
    if insn.has_lock_prefix or insn.has_rep_prefix or insn.has_repne_prefix or insn.op_count != 2:
        return None
    operands = memory_operands(insn, read)
    if len(operands) != 1:
        return None
    va, size, _ = operands[0]
    kind0, kind1 = insn.op0_kind, insn.op1_kind
    if insn.mnemonic == ix.Mnemonic.MOV and kind0 == ix.OpKind.MEMORY:
        if kind1 == ix.OpKind.REGISTER:
            value = gpr_value(insn.op1_register, read) if ix.RegisterExt.is_gpr(insn.op1_register) else None
        elif kind1 != ix.OpKind.MEMORY:
            value = insn.immediate(1)
        else:
            value = None
        if value is None:
            return None
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return MmioAccess(va, size, True, data, ix.Register.NONE, False, insn.next_ip)
    if insn.mnemonic in _LOADS and kind0 == ix.OpKind.REGISTER and kind1 == ix.OpKind.MEMORY:
        if not ix.RegisterExt.is_gpr(insn.op0_register):
            return None
        return MmioAccess(va, size, False, b"", insn.op0_register, _LOADS[insn.mnemonic], insn.next_ip)
    return None
