"""The guest's 4-level page walk, done in software because unicorn's virtual-TLB mode does not walk tables.

``walk()`` is a pure function of the control registers and a ``read_pte(gpa)`` callback, so it can be tested
without unicorn. Page-table entries are guest-physical reads; the callback returns the 8-byte entry or, when
the gpa is not plain memory, the resolver's non-``Mapped`` result, which the walk hands back unchanged (the
CPU turns it into a memory-fault exit, a retry or an emulation failure, as KVM does for a TDP fault taken
during a guest page walk).

Architecture covered (SDM vol. 3 §4.5-4.7): 4-level paging, 4 KiB/2 MiB/1 GiB leaves, P, R/W (with CR0.WP),
U/S, NX (with EFER.NXE; bit 63 is reserved without it), SMEP and SMAP (EFLAGS.AC), and the #PF error code
(P, W/R, U/S, RSVD, I/D). Not modelled: accessed/dirty bits are not written back, protection keys, LA57,
MAXPHYADDR-reserved bits (52 bits are assumed), and implicit supervisor accesses made at CPL 3 (for
example descriptor-table reads) are checked with CPL 3's rights.

**Private access bit** (sim-only, ``walk(..., private_bit=N)``; the profile option ``private_access_bit``
on a KVM_X86_SW_PROTECTED_VM). Models the SEV C-bit: bit N is removed from the frame address of every entry
(leaf and non-leaf), and the *leaf's* bit N says whether the access is private (``Translation.private``),
which the CPU passes to the fault path so an access against the gfn's attribute exits with
KVM_EXIT_MEMORY_FAULT (``kvm_mmu_faultin_pfn``'s mismatch check). Page-table reads themselves stay attribute-derived
(the C-bit of
non-leaf entries and CR3 is ignored), and instruction fetches follow the leaf bit too (real SNP forces them
private). Without the option (``private_bit=None``) bit N is an ordinary address bit and
``Translation.private`` is None: the access type comes from the attribute, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvmgmem.backends.sim.cpu.types import FaultResult

ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_FETCH = 2

PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PS = 1 << 7
PTE_NX = 1 << 63
PTE_ADDR = 0x000F_FFFF_FFFF_F000

PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4

CR0_WP = 1 << 16
CR4_PAE = 1 << 5
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_NXE = 1 << 11
EFLAGS_AC = 1 << 18


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Translation:
    """A successful walk: ``gpa`` of the accessed byte and what this privilege level may do with the page."""

    gpa: int
    page_size: int
    writable: bool
    executable: bool
    private: bool | None = None  # the leaf's private access bit; None when the walk has no such bit


@dataclass(frozen=True)
class PageFault:
    """The walk raises #PF with this error code (CR2 is the faulting linear address)."""

    error_code: int


@dataclass(frozen=True)
class NonCanonical:
    """A non-canonical linear address: #GP(0) (or #SS for stack accesses; we always report #GP)."""


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Paging:
    """The control-register state a walk depends on."""

    cr0: int
    cr3: int
    cr4: int
    efer: int
    eflags: int
    cpl: int

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & (1 << 31))


WalkResult = Translation | PageFault | NonCanonical | FaultResult


def is_canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == 0x1FFFF


def walk(
    va: int,
    access: int,
    regs: Paging,
    read_pte: Callable[[int], int | FaultResult],
    private_bit: int | None = None,
) -> WalkResult:
    """Translate linear address ``va`` for ``access`` (ACCESS_*) under ``regs``; ``private_bit`` is the
    private access bit (module docstring) or None."""
    if not regs.paging:  # unicorn-style flat long mode: VA = PA
        return Translation(va, 1 << 12, True, True)
    if not is_canonical(va):
        return NonCanonical()
    user = regs.cpl == 3
    nxe = bool(regs.efer & EFER_NXE)
    fetch_bit = PFERR_FETCH if access == ACCESS_FETCH and (nxe or regs.cr4 & CR4_SMEP) else 0
    base_err = (PFERR_WRITE if access == ACCESS_WRITE else 0) | (PFERR_USER if user else 0) | fetch_bit

    c_bit = 0 if private_bit is None else 1 << private_bit
    addr_mask = PTE_ADDR & ~c_bit
    table = regs.cr3 & addr_mask
    rw = us = True
    nx = False
    gpa = page_size = 0
    private = False
    for level, shift in enumerate((39, 30, 21, 12)):
        pte_gpa = table + ((va >> shift) & 0x1FF) * 8
        pte = read_pte(pte_gpa)
        if not isinstance(pte, int):
            return pte
        if not pte & PTE_P:
            return PageFault(base_err)
        if (pte & PTE_NX and not nxe) or (level == 0 and pte & PTE_PS):
            return PageFault(base_err | PFERR_PRESENT | PFERR_RSVD)
        rw = rw and bool(pte & PTE_RW)
        us = us and bool(pte & PTE_US)
        nx = nx or bool(pte & PTE_NX)
        if shift == 12 or (shift in (30, 21) and pte & PTE_PS):
            page_size = 1 << shift
            frame = pte & addr_mask & ~(page_size - 1)
            if page_size > 4096 and pte & addr_mask & (page_size - 1) & ~0x1000:  # reserved bits below frame
                return PageFault(base_err | PFERR_PRESENT | PFERR_RSVD)
            gpa = frame | (va & (page_size - 1))
            private = bool(pte & c_bit)
            break
        table = pte & addr_mask

    smap = bool(regs.cr4 & CR4_SMAP) and not (regs.eflags & EFLAGS_AC)
    if user:
        readable = us
        writable = us and rw
        executable = us and not nx
    else:
        readable = not (us and smap)
        writable = readable and (rw or not (regs.cr0 & CR0_WP))
        executable = not nx and not (us and regs.cr4 & CR4_SMEP)
    allowed = {ACCESS_READ: readable, ACCESS_WRITE: writable, ACCESS_FETCH: executable}[access]
    if not allowed:
        return PageFault(base_err | PFERR_PRESENT)
    return Translation(gpa, page_size, writable, executable, None if private_bit is None else private)
