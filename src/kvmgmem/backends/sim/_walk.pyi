"""Type stub for the C extension ``_walk.c``: the TLB-fill fast path's guest page walk over cached tables."""

def set_layout(off_cr: int, off_efer: int, off_eflags: int, off_hflags: int, /) -> None:
    """Offsets of CR0/CR3/CR4, EFER, EFLAGS and hflags inside unicorn's saved x86 context."""

def walk(
    ctx_address: int, tables: dict[int, int], va: int, mask: int, c_bit: int, write: bool, /
) -> tuple[int, bool, bool | None] | None:
    """``(gpa_page, writable, private)`` for ``va``, or None when the full walk must decide (a miss, a fault,
    a table not cached)."""

def set_entry(entry: int, paddr: int, perms: int, /) -> None:
    """Write unicorn's ``uc_tlb_entry`` (window address, UC_PROT_* bits) at address ``entry``."""
