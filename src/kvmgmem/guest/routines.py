"""Guest routines the conformance tests and the demo share: fill, verify, read-loop, touch pages, hypercalls,
ucall and spin loops.

Each function appends straight-line code to an ``Asm`` (no calls, so they work at any privilege and need no
stack discipline). Ranges and values may be ints or 64-bit registers; the registers each routine clobbers
are listed in its docstring. Byte loops use the ``rep`` string instructions, 8 bytes at a time plus a byte
tail, because CPL0 code on this host runs through KVM's emulator (README.md, Backends) and the sim pays per
instruction too.
"""

from __future__ import annotations

from kvmgmem import uapi
from kvmgmem.guest import ucall as U
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.operands import Label, Reg, al, byte, edx, qword, rax, rbx, rcx, rdi, rdx, rsi

Value = int | Reg

BYTES8 = 0x0101010101010101


def _load(a: Asm, reg: Reg, value: Value) -> None:
    if isinstance(value, Reg):
        if value != reg:
            a.mov(reg, value)
    else:
        a.mov(reg, value & (1 << 64) - 1)


def _plain_length(length: Value, clobbered: tuple[Reg, ...]) -> bool:
    """Whether ``length`` stays readable after the qword pass (an int, or a register the routine keeps)."""
    return isinstance(length, int) or length not in clobbered


def fill(a: Asm, start: Value, length: Value, value: int) -> Asm:
    """Set [start, start+length) to byte ``value``. Clobbers rax, rcx, rdi.

    Stores 8 bytes at a time (``rep stosq``) then the 0-7 byte tail (``rep stosb``): the sim pays per store
    (issue 15: about 40 ns per byte store in unicorn), KVM's CPL0 emulator per iteration. A length held in
    rax/rcx/rdi itself falls back to ``rep stosb``, since the qword pass would destroy it."""
    if not _plain_length(length, (rax, rcx, rdi)):
        _load(a, rdi, start)
        _load(a, rcx, length)
        a.mov(rax, value & 0xFF)
        return a.rep_stosb()
    _load(a, rdi, start)  # first: start may be rcx
    a.mov(rax, (value & 0xFF) * BYTES8)
    if isinstance(length, int):
        if length >= 8:
            a.mov(rcx, length // 8).rep_stosq()
        if length % 8:
            a.mov(rcx, length % 8).rep_stosb()
        return a
    a.mov(rcx, length).shr(rcx, 3).rep_stosq()
    return a.mov(rcx, length).and_(rcx, 7).rep_stosb()


def verify(a: Asm, start: Value, length: Value, value: int, check: str = "verify") -> Asm:
    """Check every byte of [start, start+length) is ``value``; on the first mismatch ASSERT_FAIL(check,
    expected=value, actual=the byte, extra=its address) and park. Clobbers rax, rcx, rdx, rdi.

    Compares 8 bytes at a time (``repe scasq``); a differing qword is rescanned bytewise so the report names
    the exact first differing byte, then the 0-7 byte tail is scanned bytewise."""
    ok, tail, scan, mismatch = Label("verify_ok"), Label("verify_tail"), Label("verify_scan"), Label("verify_bad")
    if not _plain_length(length, (rax, rcx, rdi)):
        a.mov(rdx, length)  # rdx is ours to clobber and survives the qword pass
        length = rdx
    _load(a, rdi, start)
    a.mov(rax, (value & 0xFF) * BYTES8)
    if isinstance(length, int):
        qwords, rest = divmod(length, 8)
        if qwords:
            a.mov(rcx, qwords).repe_scasq().je(tail)  # ZF=1 after the scan: all qwords equal
            a.sub(rdi, 8).mov(rcx, 8).jmp(scan)  # rescan the differing qword bytewise to find the byte
        a.label(tail)
        if not rest:
            a.jmp(ok)
        else:
            a.mov(rcx, rest)
    else:
        a.mov(rcx, length).shr(rcx, 3).jz(tail)
        a.repe_scasq().je(tail)
        a.sub(rdi, 8).mov(rcx, 8).jmp(scan)
        a.label(tail).mov(rcx, length).and_(rcx, 7).jz(ok)
    a.label(scan).repe_scasb().je(ok)
    a.label(mismatch).dec(rdi).movzx(edx, byte[rdi])
    U.assert_fail(a, check, value & 0xFF, rdx, rdi)
    return a.label(ok)


def read_loop(a: Asm, gva: Value) -> Asm:
    """Read the u64 at ``gva`` forever (the PK cases' guest: the access the host races against). Clobbers rax, rbx."""
    _load(a, rbx, gva)
    top = Label("read_loop")
    return a.label(top).mov(rax, qword[rbx]).jmp(top)


def touch_pages(a: Asm, start: Value, length: Value, *, value: int | None = 0, stride: int = uapi.PAGE_SIZE) -> Asm:
    """Access the first byte of every ``stride`` of [start, start+length) to fault each page in: write
    ``value`` there, or only read it when ``value`` is None. Clobbers rax, rcx, rdi."""
    if stride <= 0 or stride & (stride - 1):
        raise ValueError("stride must be a power of two")
    done, top = Label("touch_done"), Label("touch")
    _load(a, rdi, start)
    _load(a, rcx, length)
    a.add(rcx, stride - 1).shr(rcx, stride.bit_length() - 1).jz(done)
    a.label(top)
    if value is None:
        a.mov(al, byte[rdi])
    else:
        a.mov(byte[rdi], value & 0xFF)
    return a.add(rdi, stride).dec(rcx).jnz(top).label(done)


def hypercall(a: Asm, nr: int, *args: Value) -> Asm:
    """KVM hypercall ABI (Documentation/virt/kvm/x86/hypercalls.rst): rax = nr, rbx/rcx/rdx/rsi = a0..a3, ``vmcall``;
    result in rax. Clobbers rax and the argument registers. Must run at CPL0: at CPL3 KVM answers -KVM_EPERM."""
    if len(args) > 4:
        raise ValueError("at most four hypercall arguments")
    for reg, value in reversed(list(zip((rbx, rcx, rdx, rsi), args, strict=False))):
        _load(a, reg, value)
    a.mov(rax, nr)
    return a.vmcall()


def map_gpa_range(
    a: Asm,
    gpa: Value,
    npages: Value,
    attrs: Value,
    *,
    expect: int | None = 0,
    check: str = "KVM_HC_MAP_GPA_RANGE",
) -> Asm:
    """KVM_HC_MAP_GPA_RANGE(gpa, npages, attrs); with ``expect`` set, ASSERT that rax equals it (as a u64,
    so ``expect=-uapi.KVM_ENOSYS`` checks the "not enabled" answer). The result stays in rax."""
    hypercall(a, uapi.KVM_HC_MAP_GPA_RANGE, gpa, npages, attrs)
    if expect is not None:
        value = expect & (1 << 64) - 1
        if value < 1 << 31 or value >= (1 << 64) - (1 << 31):
            U.assert_eq(a, rax, value if value < 1 << 31 else value - (1 << 64), check)
        else:
            a.mov(rdx, value)
            U.assert_eq(a, rax, rdx, check)
    return a


def sync_loop(a: Asm) -> Asm:
    """SYNC(rax), ``inc rax``, forever: the n-th ucall after entry reports rax + n, so a host loop can check it
    sees every ucall once (the ucall round-trip guest of bench 11 and the watchdog tests). Clobbers rax."""
    top = Label("sync_loop")
    a.label(top)
    U.sync(a, rax)
    return a.inc(rax).jmp(top)


def spin_counter(a: Asm, counter: Value = rsi) -> Asm:
    """``inc qword [counter]`` forever — a vCPU whose progress the host can sample (default: the vCPU's
    data area, which the image passes in rsi). Clobbers rbx."""
    _load(a, rbx, counter)
    top = Label("spin")
    return a.label(top).inc(qword[rbx]).jmp(top)
