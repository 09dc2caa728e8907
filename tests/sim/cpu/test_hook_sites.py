"""Where the sim vCPU puts its code hooks (backends/sim/cpu/sites.py): never on an ordinary instruction.

Unicorn runs its hook dispatch, a walk over every code hook of the engine, each time a hooked instruction
runs; a hook on a hot instruction made a 130 KB selftest guest run at ~1 µs per loop iteration (issue 15).
These tests check the structure, not the time: which instruction starts carry a hook, that a rescan of
unchanged code adds none, and that the lazily decided IN/OUT sites still give exact exits.
"""

from __future__ import annotations

import iced_x86 as ix
import pytest

from kvmgmem.backends.sim.cpu import SimCpu
from kvmgmem.backends.sim.cpu.exc import NeedRetry
from kvmgmem.exits import HltExit, IoExit

from .simcpu_guest import CODE, Asm, C, Guest, I, R

FALSE_CANDIDATES = 200  # `mov eax, 0xedecedec`: four false IN/OUT candidate bytes each


def starts(code: bytes, ip: int) -> dict[int, ix.Instruction]:
    """Instruction starts of straight-line code, by address."""
    return {insn.ip: insn for insn in ix.Decoder(64, code, ip=ip)}


def hot_loop_program() -> Asm:
    """A loop whose ``cmp r13, rbp`` (49 39 ed) holds an `in eax, dx` byte right before the next instruction,
    then many more false candidates, one OUT and a HLT."""
    a = Asm().mov_imm(R.RCX, 1000).label("top")
    a(I.create_reg_reg(C.CMP_RM64_R64, R.R13, R.RBP))
    a(I.create_reg(C.DEC_RM64, R.RCX)).branch(C.JNE_REL8_64, "top")
    for _ in range(FALSE_CANDIDATES):
        a(I.create_reg_u32(C.MOV_R32_IMM32, R.EAX, 0xEDECEDEC))
    return a.out(0x10).hlt()


def run_to_hlt(cpu: SimCpu) -> None:
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x10, ex
    assert isinstance(cpu.run(), HltExit)


def test_false_candidates_never_hook_an_instruction_start(guest: Guest) -> None:
    prog = hot_loop_program()
    code = prog.encode(CODE)
    assert b"\x49\x39\xed" in code
    guest.write(CODE, code)
    cpu = guest.cpu()
    run_to_hlt(cpu)
    insns = starts(code, CODE)
    out = next(a for a, i in insns.items() if i.mnemonic == ix.Mnemonic.OUT)
    hlt = next(a for a, i in insns.items() if i.mnemonic == ix.Mnemonic.HLT)
    live = cpu._sites.live()
    assert len(live) > 4 * FALSE_CANDIDATES  # the false candidates are hooked (inside other instructions) ...
    hooked_starts = set(live) & set(insns)
    # ... but the only hooked instruction starts are the real OUT's successor and the real HLT
    assert hooked_starts == {out + insns[out].len, hlt}, sorted(map(hex, hooked_starts))
    cmp = CODE + code.index(b"\x49\x39\xed")
    assert cmp + 3 in insns and cmp + 3 not in live  # the `dec` after the ED byte
    assert not any(live[a] for a in hooked_starts)  # no hook left that stops before an instruction


def test_rescanning_unchanged_code_adds_no_hook(guest: Guest) -> None:
    guest.load(hot_loop_program())
    cpu = guest.cpu()
    run_to_hlt(cpu)
    hooks = len(cpu._sites.hooks)
    for _ in range(3):
        regs = cpu.get_regs()
        regs.rip = CODE
        cpu.set_regs(regs)  # drops translations and the TLB: every page is fetched and scanned again
        run_to_hlt(cpu)
    assert len(cpu._sites.hooks) == hooks


def test_rewritten_code_reuses_retired_hooks(guest: Guest) -> None:
    """A page whose bytes changed loses its old sites; their hooks are moved, not added to the list."""
    guest.load(hot_loop_program())
    cpu = guest.cpu()
    run_to_hlt(cpu)
    assert cpu._sites.hooks.movable  # the unicorn this project pins has the struct hook layout we check
    hooks = len(cpu._sites.hooks)
    a = Asm()
    for _ in range(FALSE_CANDIDATES):
        a(I.create_reg_u32(C.MOV_R32_IMM32, R.EDX, 0xE4E5E6E7))
    code = a.out(0x10).hlt().encode(CODE)
    guest.write(CODE, code)
    cpu.invalidate_code()
    regs = cpu.get_regs()
    regs.rip = CODE
    cpu.set_regs(regs)
    run_to_hlt(cpu)
    # the new page has as many candidates as the old one (~800): without reuse the list would double
    assert len(cpu._sites.live()) > 4 * FALSE_CANDIDATES
    assert len(cpu._sites.hooks) < hooks + 50
    insns = starts(code, CODE)
    hooked = set(cpu._sites.live()) & set(insns)  # the old program's sites at these starts went with it
    assert {insns[a].mnemonic for a in hooked} == {ix.Mnemonic.HLT}, sorted(map(hex, hooked))


def test_prefixed_in_whose_prefix_ends_the_previous_page(guest: Guest) -> None:
    """``66 ed`` (in ax, dx) with the 66 on the last byte of a page: exact exit, RIP on the prefix."""
    start = CODE + 0x1000 - 9
    code = bytes.fromhex("4831db" "ba34120000" "66ed" "4883c301" "f4")  # fmt: skip
    guest.write(start, code)
    cpu = guest.cpu(rip=start)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and not ex.is_out and ex.port == 0x1234 and ex.size == 2
    regs = cpu.get_regs()
    assert regs.rip == CODE + 0xFFF and regs.rbx == 0
    cpu.complete_io(b"\x78\x56")
    assert isinstance(cpu.run(), HltExit)
    regs = cpu.get_regs()
    assert regs.rbx == 1 and regs.rax & 0xFFFF == 0x5678


def test_rex_prefix_ending_a_page_is_decided_once(guest: Guest) -> None:
    """A REX byte on the last byte of a page might prefix an IN/OUT on the next: the vCPU stops before it
    once, decodes ``mov rax, rbx`` there, retires the site and runs on."""
    start = CODE + 0x2000 - 4
    guest.write(start, bytes.fromhex("4831c0" "4889d8" "f4"))  # fmt: skip
    cpu = guest.cpu(rip=start)
    regs = cpu.get_regs()
    regs.rbx = 0x55
    cpu.set_regs(regs)
    assert isinstance(cpu.run(), HltExit)
    assert cpu.get_regs().rax == 0x55
    assert CODE + 0x1FFF not in cpu._sites.live()
    assert not cpu._sites.is_pending(CODE + 0x1FFF)


def test_prefix_before_a_page_that_cannot_be_fetched_faults_like_the_cpu(guest: Guest) -> None:
    """The 66 of ``66 ed`` ends a page whose successor is not present: the pending site there neither hangs
    the vCPU nor hides the instruction fetch's #PF (CR2 = the next page)."""
    handler = CODE + 0x5000
    guest.load(Asm().out(0x40).hlt(), handler)
    guest.set_handler(14, handler)
    start = CODE + 0x3000 - 9
    guest.write(start, bytes.fromhex("4831db" "ba34120000" "66ed" "f4"))  # fmt: skip
    guest.set_u64(guest.pte_addr(CODE + 0x3000), 0)  # not present
    cpu = guest.cpu(rip=start)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x40, ex
    assert cpu.get_sregs().cr2 == CODE + 0x3000


def test_rewriting_the_next_page_reopens_a_decided_prefix(guest: Guest) -> None:
    """``48`` ending a page was decided as ``mov rax, rbx`` with the next page's bytes; when the host rewrites
    that next page into ``ed`` (``48 ed`` = in eax, dx) the site is pending again and the IN exits exactly."""
    start = CODE + 0x4000 - 4
    guest.write(start, bytes.fromhex("4831c0" "4889d8" "f4"))  # fmt: skip
    cpu = guest.cpu(rip=start)
    assert isinstance(cpu.run(), HltExit)
    guest.write(CODE + 0x4000, b"\xed\xf4")
    cpu.invalidate_code()
    regs = cpu.get_regs()
    regs.rip, regs.rdx = start, 0x77
    cpu.set_regs(regs)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and not ex.is_out and ex.port == 0x77 and ex.size == 4, ex
    assert cpu.get_regs().rip == CODE + 0x3FFF
    cpu.complete_io(b"\x01\x02\x03\x04")
    assert isinstance(cpu.run(), HltExit)
    assert cpu.get_regs().rax == 0x04030201


def test_hlt_exit_reads_no_guest_memory(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """HLT is told from the hook slot and the scan alone: a Python-side guest read that has to be retried
    (a flush request pending) used to send the vCPU on past the HLT."""
    guest.load(Asm().mov_imm(R.RBX, 1).hlt().mov_imm(R.RBX, 2).hlt())
    cpu = guest.cpu()

    def retried(*_args: object, **_kwargs: object) -> bytes:
        raise NeedRetry()

    monkeypatch.setattr(cpu.memory, "read_virt", retried)
    assert isinstance(cpu.run(), HltExit)
    assert cpu.get_regs().rbx == 1
