"""Hypercalls (`kvm_emulate_hypercall`, KVM_HC_MAP_GPA_RANGE) and exceptions delivered through the guest IDT; triple
fault → shutdown."""

from __future__ import annotations

import iced_x86 as ix

from kvmgmem import uapi
from kvmgmem.exits import HltExit, HypercallExit, IoExit, ShutdownExit

from .simcpu_guest import CODE, DATA, IDT, Asm, C, Guest, I, R, mem_op

MASK64 = (1 << 64) - 1


def _hypercall_guest(a0: int, a1: int, a2: int = 0x10, insn: ix.Instruction | None = None) -> Asm:
    a = Asm().mov_imm(R.RAX, uapi.KVM_HC_MAP_GPA_RANGE).mov_imm(R.RBX, a0).mov_imm(R.RCX, a1).mov_imm(R.RDX, a2)
    return a(insn or I.create(C.VMCALL)).out(0x10).hlt()


def test_map_gpa_range_exit_and_completion(guest: Guest) -> None:
    guest.resolver.hypercall_exit_mask = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    guest.load(_hypercall_guest(0x200000, 4, 0x10))
    cpu = guest.cpu()
    ex = cpu.run()
    assert ex == HypercallExit(uapi.KVM_HC_MAP_GPA_RANGE, (0x200000, 4, 0x10, 0, 0, 0), True)
    vmcall_rip = cpu.get_regs().rip
    assert guest.mem[vmcall_rip : vmcall_rip + 3] == b"\x0f\x01\xc1"
    cpu.complete_hypercall(-5)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.value == (-5) & 0xFFFFFFFF
    assert cpu.get_regs().rax == (-5) & MASK64
    assert isinstance(cpu.run(), HltExit)


def test_vmmcall_is_a_hypercall_too(guest: Guest) -> None:
    guest.resolver.hypercall_exit_mask = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    guest.load(_hypercall_guest(0x1000, 1, 0, I.create(C.VMMCALL)))
    ex = guest.cpu().run()
    assert isinstance(ex, HypercallExit) and ex.args[:3] == (0x1000, 1, 0)


def test_enosys_when_exit_not_enabled(guest: Guest) -> None:
    guest.load(_hypercall_guest(0x200000, 4))
    cpu = guest.cpu()
    ex = cpu.run()
    assert isinstance(ex, IoExit)
    assert cpu.get_regs().rax == (-uapi.KVM_ENOSYS) & MASK64


def test_einval_cases(guest: Guest) -> None:
    guest.resolver.hypercall_exit_mask = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    for a0, a1 in ((0x200001, 1), (0x200000, 0), (0x1000, MASK64)):  # gfn + npages wraps in u64
        g = guest
        g.load(_hypercall_guest(a0, a1))
        cpu = g.cpu()
        assert isinstance(cpu.run(), IoExit)
        assert cpu.get_regs().rax == (-uapi.KVM_EINVAL) & MASK64, (a0, a1)


def test_unknown_hypercall_is_enosys(guest: Guest) -> None:
    guest.load(Asm().mov_imm(R.RAX, 99)(I.create(C.VMCALL)).out(0x10).hlt())
    cpu = guest.cpu()
    assert isinstance(cpu.run(), IoExit)
    assert cpu.get_regs().rax == (-uapi.KVM_ENOSYS) & MASK64


def test_cpl3_hypercall_is_eperm(guest: Guest) -> None:
    guest.resolver.hypercall_exit_mask = 1 << uapi.KVM_HC_MAP_GPA_RANGE
    guest.load(_hypercall_guest(0x200000, 1))
    cpu = guest.cpu(user=True)
    assert cpu.get_sregs().cs.dpl == 3
    assert isinstance(cpu.run(), IoExit)
    assert cpu.get_regs().rax == (-uapi.KVM_EPERM) & MASK64


def test_the_cpu_asks_the_resolver_and_applies_its_answer(guest: Guest) -> None:
    """The CPU decides nothing about a hypercall: it passes CPL, RAX and RBX/RCX/RDX/RSI to the resolver
    (``kvm_emulate_hypercall`` is the kernel model's), writes an int answer to RAX and steps over the VMCALL."""
    guest.resolver.hypercall_answer = 42
    a = Asm().mov_imm(R.RAX, 77).mov_imm(R.RBX, 1).mov_imm(R.RCX, 2).mov_imm(R.RDX, 3).mov_imm(R.RSI, 4)
    guest.load(a(I.create(C.VMCALL)).out(0x10).hlt())
    cpu = guest.cpu(user=True)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.value == 42
    assert guest.resolver.hypercalls == [(3, 77, 1, 2, 3, 4)]
    exit = HypercallExit(5, (6, 7, 8, 0, 0, 0), True)
    guest.resolver.hypercall_answer = exit  # any exit the resolver returns is the run's, completed as such
    guest.load(Asm()(I.create(C.VMMCALL)).out(0x10).hlt())
    cpu = guest.cpu()
    assert cpu.run() is exit
    cpu.complete_hypercall(9)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.value == 9
    assert guest.resolver.hypercalls[-1][0] == 0  # CPL 0


def _handler_reporting(port: int, with_error_code: bool) -> Asm:
    """Handler: OUT the vector-specific port with CR2, then the error code (if any), then HLT."""
    a = Asm()(I.create_reg_reg(C.MOV_R64_CR, R.RAX, R.CR2)).out(port)
    if with_error_code:
        a(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(0, R.RSP)))
    else:
        a.mov_imm(R.RAX, 0)
    return a.out(port + 1).hlt()


def test_page_fault_delivered_through_idt(guest: Guest) -> None:
    handler = CODE + 0x1000
    guest.load(_handler_reporting(0x40, True), handler)
    guest.set_handler(14, handler)
    target = DATA + 0x2000 + 0x18
    guest.set_u64(guest.pte_addr(target), 0)  # not present
    a = Asm().mov_imm(R.RAX, 7)(I.create_mem_reg(C.MOV_RM64_R64, mem_op(target), R.RAX)).hlt()
    guest.load(a)
    cpu = guest.cpu()
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x40
    assert cpu.get_sregs().cr2 == target
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x41 and ex.value == 0b010  # W, not present, supervisor
    regs = cpu.get_regs()
    # frame: error code, RIP (the faulting store), CS, RFLAGS, RSP, SS
    assert guest.u64(regs.rsp + 8) == CODE + 10
    assert guest.u64(regs.rsp + 16) == 8


def test_write_protect_fault_error_code(guest: Guest) -> None:
    handler = CODE + 0x1000
    guest.load(_handler_reporting(0x40, True), handler)
    guest.set_handler(14, handler)
    target = DATA + 0x3000
    guest.set_u64(guest.pte_addr(target), target | 1 | 4)  # present, read-only (CR0.WP=1)
    guest.load(Asm()(I.create_mem(C.INC_RM64, mem_op(target))).hlt())
    cpu = guest.cpu()
    assert cpu.run().value == target  # type: ignore[attr-defined]
    assert cpu.run().value == 0b011  # type: ignore[attr-defined]


def test_ud_and_int3_delivered(guest: Guest) -> None:
    ud_handler, bp_handler = CODE + 0x1000, CODE + 0x1100
    guest.load(Asm().out_rax(0x60, 6).hlt(), ud_handler)
    guest.load(
        Asm()(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(0, R.RSP))).out(0x61)(I.create(C.IRETQ)), bp_handler
    )
    guest.set_handler(6, ud_handler)
    guest.set_handler(3, bp_handler, dpl=3)
    guest.load(Asm()(I.create(C.INT3)).out_rax(0x62, 1)(I.create(C.UD2)).hlt())
    cpu = guest.cpu()
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x61 and ex.value == CODE + 1  # INT3 pushes the next RIP
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x62  # iretq came back
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x60
    regs = cpu.get_regs()
    assert guest.mem[guest.u64(regs.rsp) : guest.u64(regs.rsp) + 2] == b"\x0f\x0b"  # pushed RIP = the UD2


def test_exception_from_cpl3_switches_to_rsp0(guest: Guest) -> None:
    handler = CODE + 0x1000
    guest.load(Asm()(I.create_reg_reg(C.MOV_R64_RM64, R.RAX, R.RSP)).out(0x40).hlt(), handler)
    guest.set_handler(6, handler)
    guest.load(Asm()(I.create(C.UD2)))
    cpu = guest.cpu(user=True)
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.value == (0x7F000 - 40) & 0xFFFFFFFF
    sregs = cpu.get_sregs()
    assert sregs.cs.selector == 8 and sregs.cs.dpl == 0 and sregs.ss.selector == 0


def test_triple_fault_is_shutdown(guest: Guest) -> None:
    guest.load(Asm()(I.create(C.UD2)))
    cpu = guest.cpu()
    sregs = cpu.get_sregs()
    sregs.idt.limit = 0
    cpu.set_sregs(sregs)
    assert isinstance(cpu.run(), ShutdownExit)


def test_page_fault_with_no_handler_double_faults(guest: Guest) -> None:
    df_handler = CODE + 0x1000
    guest.load(Asm().out_rax(0x48, 8).hlt(), df_handler)
    guest.set_handler(8, df_handler, ist=1)
    guest.write(IDT + 14 * 16, bytes(16))  # #PF gate not present → #NP... → contributory on #PF → #DF
    guest.set_u64(guest.pte_addr(DATA), 0)
    guest.load(Asm()(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(DATA))).hlt())
    cpu = guest.cpu()
    ex = cpu.run()
    assert isinstance(ex, IoExit) and ex.port == 0x48
    assert cpu.get_regs().rsp == 0x9F000 - 48  # IST1 stack, error-code frame
