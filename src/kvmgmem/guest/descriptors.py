"""GDT, TSS and IDT contents: the CPU data structures a long-mode guest needs, as bytes.

The values are the ones measured working on this host's KVM (code64 ``0x00af9a000000ffff``,
data ``0x00cf92000000ffff``, user data/code at DPL3 with selectors 0x2b/0x33, a busy 64-bit TSS), and the
matching hidden segment state for ``KVM_SET_SREGS`` is produced here too, so the two can never disagree.
"""

from __future__ import annotations

import struct

from kvmgmem import uapi

KERNEL_CS, KERNEL_DS = 0x08, 0x10
USER_DS, USER_CS = 0x28 | 3, 0x30 | 3
TSS_FIRST = 0x40  # vCPU i's TSS descriptor (16 bytes) is at selector 0x40 + 16*i

_KCODE = 0x00AF9A000000FFFF
_KDATA = 0x00CF92000000FFFF
_UDATA = 0x00CFF2000000FFFF
_UCODE = 0x00AFFA000000FFFF

TSS_SIZE = 0x68
TSS_STRIDE = 0x80
IO_BITMAP_SIZE = 8192 + 1  # one bit per port, plus the all-ones terminator byte the SDM asks for
TSS_TYPE_BUSY = 0xB
INTERRUPT_GATE = 0xE

#: Exception vectors whose CPU-pushed frame includes an error code.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})


def tss_selector(index: int) -> int:
    return TSS_FIRST + 16 * index


def gdt(tss: list[tuple[int, int]]) -> bytes:
    """Null, kernel code/data, user data/code (DPL3), then one 16-byte TSS descriptor per (base, limit)."""
    entries = [0, _KCODE, _KDATA, 0, 0, _UDATA, _UCODE, 0]
    raw = b"".join(struct.pack("<Q", e) for e in entries)
    for base, limit in tss:
        low = (
            (limit & 0xFFFF)
            | (base & 0xFFFFFF) << 16
            | (TSS_TYPE_BUSY | 0x80) << 40  # type, P=1, DPL 0
            | ((limit >> 16) & 0xF) << 48
            | ((base >> 24) & 0xFF) << 56
        )
        raw += struct.pack("<QQ", low, base >> 32)
    return raw


def tss(rsp0: int, iomap_offset: int) -> bytes:
    """A 64-bit TSS: RSP0 is the stack faults from CPL3 switch to; no IST.

    ``iomap_offset`` points (relative to this TSS) at an all-zero I/O permission bitmap, i.e. every port is
    allowed at CPL3. Why not rely on RFLAGS.IOPL=3: this host's KVM runs CPL3 with IOPL forced to 0 (an
    ``iretq`` with IOPL=3 lands with RFLAGS 0x202), and then OUT consults the TSS bitmap, #GP without one.
    """
    raw = bytearray(TSS_SIZE)
    struct.pack_into("<Q", raw, 4, rsp0)
    struct.pack_into("<H", raw, 0x66, iomap_offset)
    return bytes(raw)


def io_bitmap() -> bytes:
    """All ports allowed, then the terminator byte."""
    return bytes(IO_BITMAP_SIZE - 1) + b"\xff"


def idt(handlers: dict[int, int], user_vectors: frozenset[int] = frozenset({3, 4})) -> bytes:
    """256 gates; vectors in ``handlers`` are present interrupt gates on the kernel CS. ``user_vectors``
    get DPL3 so ``int3``/``into`` work from CPL3 (the only ``int`` this host allows there)."""
    raw = bytearray(256 * 16)
    for vector, target in handlers.items():
        dpl = 3 if vector in user_vectors else 0
        attr = 0x80 | dpl << 5 | INTERRUPT_GATE
        struct.pack_into(
            "<HHBBHIxxxx", raw, vector * 16,
            target & 0xFFFF, KERNEL_CS, 0, attr, (target >> 16) & 0xFFFF, target >> 32,
        )  # fmt: skip
    return bytes(raw)


def _segment(seg: uapi.kvm_segment, selector: int, code: bool, dpl: int) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if code else 1
    seg.s = 1
    seg.l = 1 if code else 0
    seg.g = 1
    seg.avl = 0
    seg.unusable = 0


def apply_long_mode(
    sregs: uapi.kvm_sregs,
    *,
    cr3: int,
    gdt_base: int,
    gdt_limit: int,
    idt_base: int,
    tss_base: int,
    tss_limit: int,
    tr: int,
) -> None:
    """Fill ``sregs`` with the 64-bit CPL0 state measured working on this host (paging, PAE, LME/LMA)."""
    _segment(sregs.cs, KERNEL_CS, code=True, dpl=0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _segment(getattr(sregs, name), KERNEL_DS, code=False, dpl=0)
    sregs.tr.base = tss_base
    sregs.tr.limit = tss_limit
    sregs.tr.selector = tr
    sregs.tr.type = TSS_TYPE_BUSY
    sregs.tr.present = 1
    sregs.tr.dpl = 0
    sregs.tr.db = 0
    sregs.tr.s = 0
    sregs.tr.l = 0
    sregs.tr.g = 0
    sregs.tr.unusable = 0
    sregs.gdt.base, sregs.gdt.limit = gdt_base, gdt_limit
    sregs.idt.base, sregs.idt.limit = idt_base, 256 * 16 - 1
    sregs.cr0 = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
    sregs.cr3 = cr3
    sregs.cr4 = 0x620  # PAE | OSFXSR | OSXMMEXCPT
    sregs.efer = 0x500  # LME | LMA
