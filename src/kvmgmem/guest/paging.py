"""Identity-mapped x86-64 page tables (gva == gpa), built as bytes for any guest-memory buffer.

Why identity: test guests name guest-physical addresses (a gmem slot at 4 GiB, a MAP_GPA_RANGE argument) and
should be able to touch them at the same virtual address. Optionally (``alias_base``/``alias_bits``) the same
physical range is mapped a second time at ``alias_base`` with extra bits in every leaf — an SEV guest's
encrypted view, whose leaves carry the C-bit (the sim's ``private_access_bit``).

Reach and leaf size are configurable; the host measured that this KVM's CPUID has no 1 GiB pages
(KVM_GET_SUPPORTED_CPUID lacks PDPE1GB, leaf 0x80000001 EDX bit 26), so callers ask :func:`max_page_size` before
choosing 1 GiB leaves.
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
    alias_base: int | None = None  # VA of the alias of gpa 0 (None: no alias)
    alias_bits: int = 0  # bits set in every alias leaf

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


def alias_table_bytes(reach: int, page_size: int) -> int:
    """Extra bytes of tables an alias of ``reach`` needs (everything but the PML4, which is shared)."""
    return table_bytes(reach, page_size) - uapi.PAGE_SIZE


def build(
    base: int,
    reach: int,
    page_size: int = PAGE_2M,
    user: bool = False,
    *,
    alias_base: int | None = None,
    alias_bits: int = 0,
) -> PageTables:
    """Identity-map [0, reach) with ``page_size`` leaves; ``user`` sets the U/S bit at every level (CPL3).

    With ``alias_base`` (a 512 GiB-aligned VA, [alias_base, alias_base + reach) not overlapping [0, reach)
    and below 128 TiB) [0, reach) is also mapped at VA ``alias_base + pa``, with ``alias_bits`` or-ed into
    every alias leaf (e.g. ``1 << 51``, a C-bit); its tables follow the identity tables."""
    if page_size not in (PAGE_4K, PAGE_2M, PAGE_1G):
        raise ValueError(f"page size must be 4 KiB, 2 MiB or 1 GiB, not {page_size:#x}")
    if reach <= 0 or reach % page_size or reach > 1 << 47:
        raise ValueError(f"reach {reach:#x} must be a positive multiple of the page size, at most 128 TiB")
    if base % uapi.PAGE_SIZE:
        raise ValueError("page tables must be page aligned")
    if page_size == PAGE_4K and reach > 4 * GiB:
        raise ValueError("4 KiB leaves are limited to 4 GiB of reach (8 MiB of tables)")
    flags = PTE_P | PTE_RW | (PTE_US if user else 0)
    if alias_base is not None:
        if alias_base % (1 << 39) or alias_base < reach or alias_base + reach > 1 << 47:
            raise ValueError(f"alias base {alias_base:#x} must be 512 GiB aligned, above the identity map's "
                             f"reach {reach:#x} and leave room for it below 128 TiB")  # fmt: skip
        if alias_bits < 0 or alias_bits >= 1 << 64 or alias_bits & ((1 << (reach - 1).bit_length()) - 1):
            raise ValueError(f"alias bits {alias_bits:#x} must be u64 bits above the mapped physical addresses")
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
    alias_offsets = [0]  # level 0 (the PML4) is shared with the identity map
    if alias_base is not None:
        for n in table_pages[1:]:
            alias_offsets.append(off)
            off += n * uapi.PAGE_SIZE
    out = array("Q", bytes(off))
    leaf_flags = flags | (PTE_PS if page_size != PAGE_4K else 0)
    _fill(out, base, offsets, counts, flags, leaf_flags, page_size, first_entry=0)
    if alias_base is not None:
        _fill(out, base, alias_offsets, counts, flags, leaf_flags | alias_bits, page_size, first_entry=alias_base >> 39)
    return PageTables(
        base=base, reach=reach, page_size=page_size, user=user, data=out.tobytes(),
        alias_base=alias_base, alias_bits=alias_bits if alias_base is not None else 0,
    )  # fmt: skip


def _fill(
    out: array[int],
    base: int,
    offsets: list[int],
    counts: list[int],
    flags: int,
    leaf_flags: int,
    page_size: int,
    first_entry: int,
) -> None:
    """Write one tree: level 0 (PML4) entries from index ``first_entry``, the rest from each table's start."""
    last = len(counts) - 1
    for level, count in enumerate(counts):
        first = offsets[level] // 8 + (first_entry if level == 0 else 0)
        if level == last:
            out[first : first + count] = array("Q", range(leaf_flags, leaf_flags + count * page_size, page_size))
        else:
            child = base + offsets[level + 1]
            out[first : first + count] = array("Q", range(child | flags, (child | flags) + count * 4096, 4096))
