"""The image's CPL0 code: exception entry stubs, the reporting handler, and the drop-to-CPL3 stub.

Kept tiny on purpose: on this host CPL0 guest code runs through KVM's instruction emulator (~1.7 M instr/s,
README.md, Backends), so the kernel only reports and hands over; payloads that need speed run at CPL3.
"""

from __future__ import annotations

from kvmgmem.guest import ucall as U
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.descriptors import ERROR_CODE_VECTORS, USER_CS, USER_DS
from kvmgmem.guest.operands import Label, cr2, dx, eax, qword, r12, r13, rax, rdx, rsp

NUM_VECTORS = 32
USER_RFLAGS = 0x3002  # IOPL=3 (port I/O allowed at CPL3), IF=0, reserved bit 1

# Frame offsets seen by the common handler after it pushed rax, rdx and reserved the ucall struct:
# [rsp] ucall struct (64) | rdx | rax | vector | error code | RIP | CS | RFLAGS | RSP | SS
_FRAME = U.UCALL_SIZE + 16


class KernelLabels:
    """Labels of the kernel code, for the IDT and the boot state."""

    def __init__(self) -> None:
        self.stubs = [Label(f"exc{v}") for v in range(NUM_VECTORS)]
        self.common = Label("exc_common")
        self.user_entry = Label("enter_user")


def emit_kernel(a: Asm) -> KernelLabels:
    """Append the kernel code to ``a`` and return its labels."""
    k = KernelLabels()
    for vector, stub in enumerate(k.stubs):
        a.label(stub)
        if vector not in ERROR_CODE_VECTORS:
            a.push(0)  # keep one frame shape: every vector has an "error code"
        a.push(vector).jmp(k.common)

    # Report EXCEPTION(vector, error code, rip, cs, cr2, rsp) through a ucall struct built in place.
    a.label(k.common).push(rax).push(rdx).sub(rsp, U.UCALL_SIZE)
    a.mov(qword[rsp], U.EXCEPTION).mov(qword[rsp + 8], 6)
    for slot, frame in ((0, 0), (1, 8), (2, 16), (3, 24)):  # vector, error code, rip, cs
        a.mov(rax, qword[rsp + _FRAME + frame]).mov(qword[rsp + 16 + 8 * slot], rax)
    a.mov(rax, cr2).mov(qword[rsp + 16 + 32], rax)
    a.mov(rax, qword[rsp + _FRAME + 40]).mov(qword[rsp + 16 + 40], rax)  # RSP at the fault

    report = Label("exc_report")
    a.mov(rax, rsp).mov(dx, U.UCALL_PORT).label(report).out(dx, eax).jmp(report)  # resuming re-reports

    # Boot stub for CPL3 payloads: r12 = user RIP, r13 = user RSP; rsp is the vCPU's kernel stack.
    a.label(k.user_entry)
    a.push(USER_DS).push(r13).push(USER_RFLAGS).push(USER_CS).push(r12).iretq()
    return k
