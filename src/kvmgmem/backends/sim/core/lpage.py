"""Huge-page "mixed" tracking per memslot (x86 ``lpage_info``: ``hugepage_has_attrs``, ``hugepage_set_mixed``).

Why: a 2 MiB or 1 GiB region may be mapped huge only while every gfn in it has the same memory attributes. The
kernel keeps one "mixed" bit per huge region of each memslot, set when the slot is created
(``kvm_mmu_init_memslot_memory_attributes``) and recomputed after each attribute change
(``kvm_arch_post_set_memory_attributes``); the fault path reads it (``Memslot.mixed``) instead of scanning the
attributes. While a change is in flight, the partly covered head and tail regions are added to the
invalidation (``kvm_arch_pre_set_memory_attributes``) so no fault maps them huge meanwhile.
"""

from __future__ import annotations

from .attributes import AttributeMap
from .memslots import HUGE_LEVELS, Memslot
from .profile import level_pages


def init_mixed(slot: Memslot, attributes: AttributeMap) -> None:
    """``kvm_mmu_init_memslot_memory_attributes``: mark every huge region of a new slot that an attribute
    boundary cuts."""
    for level in HUGE_LEVELS:
        n = level_pages(level)
        for b in attributes.boundaries(slot.base_gfn, slot.end_gfn):
            if b % n and slot.contains_region(b - b % n, level):
                slot.mixed[level].set(b // n, b // n + 1, True)


def update_mixed(slot: Memslot, attributes: AttributeMap, start: int, end: int) -> None:
    """``kvm_arch_post_set_memory_attributes`` after storing attributes on ``[start, end)``: fully covered
    regions are uniform now, the partially covered head and tail regions are recomputed."""
    for level in HUGE_LEVELS:
        n = level_pages(level)
        first_full, last_full = -(-start // n), end // n
        if first_full < last_full:
            slot.mixed[level].set(first_full, last_full, False)
        for r in {start // n, (end - 1) // n}:
            if (r * n < start or (r + 1) * n > end) and slot.contains_region(r * n, level):
                slot.mixed[level].set(r, r + 1, not attributes.is_uniform(r * n, (r + 1) * n))


def head_tail_regions(slot: Memslot, lo: int, hi: int) -> list[tuple[int, int]]:
    """The huge regions a change of ``[lo, hi)`` covers only partly and that are not "mixed" yet: a fault
    must not map them huge while the change is in flight."""
    out = []
    for level in HUGE_LEVELS:
        n = level_pages(level)
        for r in {lo // n, (hi - 1) // n}:
            partial = r * n < lo or (r + 1) * n > hi
            if partial and slot.contains_region(r * n, level) and not slot.mixed[level].get(r):
                out.append((r * n, (r + 1) * n))
    return out
