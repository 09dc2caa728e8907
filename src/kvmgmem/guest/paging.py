"""Identity-mapped x86-64 page tables (gva == gpa), built as bytes for any guest-memory buffer.

Why identity: test guests name guest-physical addresses (a gmem slot at 4 GiB, a MAP_GPA_RANGE argument) and
should be able to touch them at the same virtual address. Reach and leaf size are configurable; the host
measured that this KVM's CPUID has no 1 GiB pages (host-probes §1), so callers ask
:func:`max_page_size` before choosing 1 GiB leaves.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from kvmgmem import uapi
from kvmgmem.api import System

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE_4K, PAGE_2M, PAGE_1G = 4 * KiB, 2 * MiB, GiB

PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_ENTRIES = 512


def max_page_size(system: System) -> int:
    """2 MiB, or 1 GiB when the system's supported CPUID offers PDPE1GB (leaf 0x80000001 EDX bit 26)."""
    try:
        entries = system.get_supported_cpuid()
    except (NotImplementedError, OSError):
        return PAGE_2M
    for e in entries:
        if e.function == 0x80000001 and e.edx & (1 << 26):
            return PAGE_1G
    return PAGE_2M


@dataclass(frozen=True)
class PageTables:
    """Page-table pages laid out contiguously from ``base``: PML4, then PDPTs, then PDs, then PTs."""

    base: int
    reach: int
    page_size: int
    user: bool
    data: bytes

    @property
    def cr3(self) -> int:
        return self.base

    @property
    def size(self) -> int:
        return len(self.data)


def _pages(count: int) -> int:
    return (count + _ENTRIES - 1) // _ENTRIES


def table_bytes(reach: int, page_size: int) -> int:
    """How many bytes of tables an identity map of ``reach`` with ``page_size`` leaves needs."""
    leaves = reach // page_size
    levels = {PAGE_4K: 4, PAGE_2M: 3, PAGE_1G: 2}[page_size]
    pages, n = 0, leaves
    for _ in range(levels):
        n = _pages(n)
        pages += n
    return pages * uapi.PAGE_SIZE


def build(base: int, reach: int, page_size: int = PAGE_2M, user: bool = False) -> PageTables:
    """Identity-map [0, reach) with ``page_size`` leaves; ``user`` sets the U/S bit at every level (CPL3)."""
    if page_size not in (PAGE_4K, PAGE_2M, PAGE_1G):
        raise ValueError(f"page size must be 4 KiB, 2 MiB or 1 GiB, not {page_size:#x}")
    if reach <= 0 or reach % page_size or reach > 1 << 47:
        raise ValueError(f"reach {reach:#x} must be a positive multiple of the page size, at most 128 TiB")
    if base % uapi.PAGE_SIZE:
        raise ValueError("page tables must be page aligned")
    if page_size == PAGE_4K and reach > 4 * GiB:
        raise ValueError("4 KiB leaves are limited to 4 GiB of reach (8 MiB of tables)")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    levels = {PAGE_4K: 4, PAGE_2M: 3, PAGE_1G: 2}[page_size]
    # counts[i] = number of entries at level i (0 = PML4 ... levels-1 = leaves)
    leaf_count = reach // page_size
    counts = [leaf_count]
    for _ in range(levels - 1):
        counts.insert(0, _pages(counts[0]))
    table_pages = [_pages(c) for c in counts]
    offsets, off = [], 0
    for n in table_pages:
        offsets.append(off)
        off += n * uapi.PAGE_SIZE
    out = array("Q", bytes(off))
    for level, count in enumerate(counts):
        first = offsets[level] // 8
        if level == levels - 1:
            leaf_flags = flags | (PTE_PS if page_size != PAGE_4K else 0)
            out[first : first + count] = array("Q", range(leaf_flags, leaf_flags + count * page_size, page_size))
        else:
            child = base + offsets[level + 1]
            out[first : first + count] = array("Q", range(child | flags, (child | flags) + count * 4096, 4096))
    return PageTables(base=base, reach=reach, page_size=page_size, user=user, data=out.tobytes())
