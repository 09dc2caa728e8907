"""The assembler DSL: encodings (against GNU as), labels, branch relaxation, errors, listings. No KVM needed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvmgmem.guest import Asm, AsmError, Label, byte, dword, mem, qword, word
from kvmgmem.guest.operands import al, ax, cl, cr3, dx, eax, ecx, edx, rax, rbx, rcx, rdi, rsi, rsp


def test_matches_gnu_as_byte_for_byte() -> None:
    """A long-mode probe snippet; ``gas`` is GNU as's encoding of the same source (``as`` + ``ld --oformat binary``)."""
    a = Asm()
    a.mov(rax, 0x1122334455667788).mov(qword[0x20000], rax).mov(dx, 0x10).out(dx, eax).in_(eax, dx).vmcall()
    a.lea(rax, "here").label("here").label("L").dec(rcx).jnz("L").hlt()
    gas = "48b88877665544332211488904250000020066ba1000efed0f01c1488d050000000048ffc975fbf4"
    assert a.assemble(0x10000).code.hex() == gas


def test_every_named_form_matches_gnu_as() -> None:
    """Each named method of every instruction family (data movement, arithmetic, control flow, system) once.

    ``gas`` is GNU as's encoding of the same Intel-syntax source where the assembler's choice among equally
    short encodings differs from gas's default: ``{load}`` on the reg,reg mov/or/xor/cmp (iced's first
    encoding is the ``r, r/m`` one, 8B/0B/33/3B) and ``data16`` on ``ltr ax`` (a 16-bit register operand
    selects the 16-bit operand-size form, which the CPU ignores for ltr).
    """
    a = Asm()
    a.mov(rax, rbx).movzx(eax, byte[rdi]).lea(rsi, mem[rdi + 8]).push(rbx).pop(rcx)
    a.rep_stosb().rep_stosq().rep_movsb().repe_cmpsb().repe_scasb().repe_scasq()
    a.add(rax, 8).sub(ecx, 0x1000).and_(eax, 0xFF).or_(rbx, rax).xor(edx, edx).shl(rax, 3).shr(rbx, cl)
    a.inc(rcx).dec(qword[rsi]).cmp(rax, rbx).test(eax, 1)
    a.label("L").jmp("L").call("L").je("L").jne("L").jz("L").jnz("L").jb("L").jae("L").ja("L").jbe("L")
    a.j("l", "L").ret()
    a.out(dx, al).in_(eax, 0x60).lgdt(mem[rax]).lidt(mem[rbx]).ltr(ax).iretq().wrmsr().rdmsr().vmcall().hlt()
    a.cpuid().pause().nop().ud2().int3().cli().sti()
    gas = (
        "488bc30fb607488d77085359f3aaf348abf3a4f3a6f3aef348af4883c00881e90010000025ff000000480bd833d248c1e003"
        "48d3eb48ffc148ff0e483bc3a901000000ebfee8f9ffffff74f775f574f375f172ef73ed77eb76e97ce7c3eee5600f0110"
        "0f011b660f00d848cf0f300f320f01c1f40fa2f390900f0bccfafb"
    )
    assert a.assemble(0).code.hex() == gas


def test_absolute_addresses_have_no_address_size_prefix() -> None:
    code = Asm().mov(rbx, qword[0x100000]).assemble(0).code
    assert code.hex() == "488b1c2500001000"  # SIB absolute, not 67-prefixed or RIP-relative


def test_forward_and_backward_branches_relax() -> None:
    a = Asm()
    a.label("top").jmp("near_end").jz("top")
    for _ in range(200):
        a.nop()
    a.label("near_end").jmp("top")
    p = a.assemble(0x1000)
    assert p.code[0] == 0xE9  # forward over 200 bytes: near jmp
    assert p.code[5] == 0x74  # short jz back to top
    assert p.code[-5] == 0xE9  # backward over 200 bytes: near
    assert p.address("near_end") == 0x1000 + 5 + 2 + 200
    assert int.from_bytes(p.code[-4:], "little", signed=True) == 0x1000 - p.end


def test_labels_and_rodata() -> None:
    a = Asm()
    s = a.cstring("hello", name="greeting")
    a.lea(rsi, s).mov(rdi, s).ret()
    p = a.assemble(0x4000)
    where = p.address("greeting")
    assert where >= 0x4000 + 7 + 10 + 1  # after all code
    assert p.code[where - 0x4000 : where - 0x4000 + 6] == b"hello\0"
    assert int.from_bytes(p.code[9:17], "little") == where  # mov rdi, imm64 = the label's address


def test_operand_forms() -> None:
    a = Asm()
    a.mov(byte[rbx + rcx * 8 + 3], 0xAA).mov(word[rsi], ax).mov(dword[rsi + 8], 1).movzx(eax, byte[rdi])
    a.push(0x3002).push(rax).pop(rbx).shl(rax, 1).shr(rbx, 12).and_(rax, 0xFFF).or_(rax, rbx).xor(eax, eax)
    a.mov(cr3, rax).mov(rax, -1).mov(rax, 0xFFFFFFFF).add(rsp, 64).sub(rsp, 8).out(0x80, al).cmp(byte[rsi], 1)
    a.rep_stosb().rep_stosq().lgdt(mem[rax]).ltr(ax).iretq().wrmsr().cpuid().pause().int3().call("f").label("f")
    listing = a.assemble(0).disassemble()
    for text in ("push 3002h", "mov cr3,rax", "rep stosq", "lgdt", "ltr ax", "iretq", "out 80h,al", "call"):
        assert text in listing, text
    assert "data16 push" not in listing  # a qword push stays a qword push


def test_mov_immediate_picks_the_right_width() -> None:
    assert Asm().mov(rax, -1).assemble(0).code.hex() == "48c7c0ffffffff"
    assert Asm().mov(rax, 0xFFFFFFFF).assemble(0).code.hex() == "48b8ffffffff00000000"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda a: a.jmp("nowhere"), "never defined"),
        (lambda a: a.label("x").label("x"), "defined twice"),
        (lambda a: a.mov(al, rax), "no 64-bit encoding"),
        (lambda a: a.mov(rax, qword[0x80000000]), "cannot encode"),
    ],
)
def test_errors_name_the_problem(build: Callable[[Asm], object], message: str) -> None:
    with pytest.raises(AsmError, match=message):
        a = Asm()
        build(a)  # some problems show at once, label problems at layout time
        a.assemble(0)


def test_label_objects_are_unique_per_fragment() -> None:
    def fragment() -> Asm:
        f = Asm()
        loop = Label("loop")
        return f.label(loop).dec(rcx).jnz(loop)

    a = Asm().include(fragment()).include(fragment()).ret()
    p = a.assemble(0)
    assert len(p.code) == 2 * 5 + 1
    with pytest.raises(AsmError, match="no unique label"):
        p.address("loop")
