"""KVM_GET/SET_REGS and KVM_GET/SET_SREGS on a unicorn engine, with KVM's semantics.

``kvm_segment`` ↔ QEMU's segment cache is the mapping QEMU's own KVM accelerator uses (``set_seg``/``get_seg``
in target/i386/kvm.c): the attribute bits are the descriptor's high dword. Segment registers are loaded
without consulting the GDT — as KVM does — by editing the CPU state (see ``uc``); CPL follows SS.DPL and
the code size follows CS.L/CS.D, recomputed like QEMU's ``x86_update_hflags``.

Control registers go through unicorn's own setters first (they update QEMU's derived state and flush its
TLB), EFER is then stored verbatim (unicorn's WRMSR would keep LMA from the reset state). CR8, APIC base and
the interrupt bitmap have no unicorn counterpart and are kept by the caller (``SimCpu``); unicorn's CR8
register id indexes past QEMU's ``cr[5]`` array, so it is never written.
"""

from __future__ import annotations

from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR2,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_GDTR,
    UC_X86_REG_IDTR,
    UC_X86_REG_LDTR,
    UC_X86_REG_R8,
    UC_X86_REG_R9,
    UC_X86_REG_R10,
    UC_X86_REG_R11,
    UC_X86_REG_R12,
    UC_X86_REG_R13,
    UC_X86_REG_R14,
    UC_X86_REG_R15,
    UC_X86_REG_RAX,
    UC_X86_REG_RBP,
    UC_X86_REG_RBX,
    UC_X86_REG_RCX,
    UC_X86_REG_RDI,
    UC_X86_REG_RDX,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSI,
    UC_X86_REG_RSP,
    UC_X86_REG_TR,
)

from kvmgmem import uapi
from kvmgmem.backends.sim.cpu.uc import (
    DESC_AVL_MASK,
    DESC_B_SHIFT,
    DESC_DPL_SHIFT,
    DESC_G_MASK,
    DESC_L_SHIFT,
    DESC_P_MASK,
    DESC_S_MASK,
    DESC_TYPE_SHIFT,
    OFF_EFER,
    OFF_HFLAGS,
    R_CS,
    R_DS,
    R_ES,
    R_FS,
    R_GS,
    R_LDT,
    R_SS,
    R_TR,
    CpuState,
    Engine,
    compute_hflags,
)

GPR_ORDER = (
    ("rax", UC_X86_REG_RAX),
    ("rbx", UC_X86_REG_RBX),
    ("rcx", UC_X86_REG_RCX),
    ("rdx", UC_X86_REG_RDX),
    ("rsi", UC_X86_REG_RSI),
    ("rdi", UC_X86_REG_RDI),
    ("rsp", UC_X86_REG_RSP),
    ("rbp", UC_X86_REG_RBP),
    ("r8", UC_X86_REG_R8),
    ("r9", UC_X86_REG_R9),
    ("r10", UC_X86_REG_R10),
    ("r11", UC_X86_REG_R11),
    ("r12", UC_X86_REG_R12),
    ("r13", UC_X86_REG_R13),
    ("r14", UC_X86_REG_R14),
    ("r15", UC_X86_REG_R15),
    ("rip", UC_X86_REG_RIP),
    ("rflags", UC_X86_REG_RFLAGS),
)
_GPR_IDS = [reg for _, reg in GPR_ORDER]

SEGMENTS = (("cs", R_CS), ("ds", R_DS), ("es", R_ES), ("fs", R_FS), ("gs", R_GS), ("ss", R_SS))


def get_regs(uc: Engine) -> uapi.kvm_regs:
    regs = uapi.kvm_regs()
    for (name, _), value in zip(GPR_ORDER, uc.reg_read_batch(_GPR_IDS), strict=True):
        setattr(regs, name, value)
    return regs


def set_regs(uc: Engine, regs: uapi.kvm_regs) -> None:
    # RFLAGS bit 1 is fixed to 1 on x86 (KVM forces it too).
    uc.reg_write_batch([(reg, getattr(regs, name) | (2 if name == "rflags" else 0)) for name, reg in GPR_ORDER])


def flags_from_segment(seg: uapi.kvm_segment) -> int:
    """QEMU descriptor-cache flags from a ``kvm_segment`` (QEMU's kvm.c ``get_seg``)."""
    if seg.unusable:
        return 0
    return (
        (seg.type << DESC_TYPE_SHIFT)
        | (DESC_P_MASK if seg.present else 0)
        | (seg.dpl << DESC_DPL_SHIFT)
        | (seg.db << DESC_B_SHIFT)
        | (DESC_S_MASK if seg.s else 0)
        | (seg.l << DESC_L_SHIFT)
        | (DESC_G_MASK if seg.g else 0)
        | (DESC_AVL_MASK if seg.avl else 0)
    )


def segment_from_cache(selector: int, base: int, limit: int, flags: int) -> uapi.kvm_segment:
    """A ``kvm_segment`` from a QEMU segment cache (QEMU's kvm.c ``set_seg``)."""
    seg = uapi.kvm_segment()
    seg.selector = selector
    seg.base = base
    seg.limit = limit
    seg.type = (flags >> DESC_TYPE_SHIFT) & 15
    seg.present = int(bool(flags & DESC_P_MASK))
    seg.dpl = (flags >> DESC_DPL_SHIFT) & 3
    seg.db = (flags >> DESC_B_SHIFT) & 1
    seg.s = int(bool(flags & DESC_S_MASK))
    seg.l = (flags >> DESC_L_SHIFT) & 1
    seg.g = int(bool(flags & DESC_G_MASK))
    seg.avl = int(bool(flags & DESC_AVL_MASK))
    seg.unusable = int(not seg.present)
    return seg


def get_sregs(uc: Engine, state: CpuState, cr8: int, apic_base: int) -> uapi.kvm_sregs:
    st = state.load()
    sregs = uapi.kvm_sregs()
    for name, index in (*SEGMENTS, ("tr", R_TR), ("ldt", R_LDT)):
        setattr(sregs, name, segment_from_cache(*st.segment(index)))
    for name, reg in (("gdt", UC_X86_REG_GDTR), ("idt", UC_X86_REG_IDTR)):
        _, base, limit, _ = uc.reg_read(reg)
        table = getattr(sregs, name)
        table.base = base
        table.limit = limit & 0xFFFF
    sregs.cr0 = st.cr(0)
    sregs.cr2 = st.cr(2)
    sregs.cr3 = st.cr(3)
    sregs.cr4 = st.cr(4)
    sregs.cr8 = cr8
    sregs.efer = st.efer
    sregs.apic_base = apic_base
    return sregs


def set_sregs(uc: Engine, state: CpuState, sregs: uapi.kvm_sregs) -> None:
    """Load ``sregs``. Order matters for unicorn's setters: EFER.LME, then CR4.PAE, CR3, CR0.PG."""
    st = state.load()
    st.set_u64(OFF_EFER, sregs.efer)
    st.store()
    uc.reg_write(UC_X86_REG_CR4, sregs.cr4)
    uc.reg_write(UC_X86_REG_CR3, sregs.cr3)
    uc.reg_write(UC_X86_REG_CR0, sregs.cr0)
    uc.reg_write(UC_X86_REG_CR2, sregs.cr2)
    uc.reg_write(UC_X86_REG_GDTR, (0, sregs.gdt.base, sregs.gdt.limit, 0))
    uc.reg_write(UC_X86_REG_IDTR, (0, sregs.idt.base, sregs.idt.limit, 0))
    for reg, seg in ((UC_X86_REG_LDTR, sregs.ldt), (UC_X86_REG_TR, sregs.tr)):
        uc.reg_write(reg, (seg.selector, seg.base, seg.limit, flags_from_segment(seg)))

    st = state.load()
    st.set_u64(OFF_EFER, sregs.efer)  # the CR0 setter may have set LMA; KVM takes EFER as given
    for name, index in SEGMENTS:
        seg = getattr(sregs, name)
        st.set_segment(index, seg.selector, seg.base, seg.limit, flags_from_segment(seg))
    st.set_u32(OFF_HFLAGS, compute_hflags(st))
    st.store()
