"""The SPTE map on its own (``core/spte_map.py``): plain objects, no VM, no locks.

What the fault path and every zap rely on: a gfn finds the one SPTE covering it at any level, a huge SPTE
replaces the small ones inside it, a range query finds a huge SPTE that starts before the range, and a zap
removes exactly what intersects its range (whole huge SPTEs), counts itself, and leaves no empty 2 MiB region
behind in the index.
"""

from __future__ import annotations

from kvmgmem.backends.sim.core.memslots import Memslot
from kvmgmem.backends.sim.core.mmu import MmuCounters
from kvmgmem.backends.sim.core.profile import PG_LEVEL_2M, PG_LEVEL_4K, level_pages
from kvmgmem.backends.sim.core.spte_map import REGION_SHIFT, UNKNOWN, Spte, SpteMap

HVA = 0x7F0000000000
N2M = level_pages(PG_LEVEL_2M)
SLOT = Memslot(1, 0, 0, 4 * N2M, 0, HVA, (HVA, HVA + 4 * N2M * 4096))


def _spte(gfn: int, level: int = PG_LEVEL_4K) -> Spte:
    return Spte(gfn, level, SLOT, None, 0, HVA + gfn * 4096, True, False)


def test_lookup_finds_the_covering_spte_at_any_level() -> None:
    m = SpteMap(MmuCounters())
    small, huge = m.install(_spte(5), None), m.install(_spte(N2M, PG_LEVEL_2M), None)
    assert m.lookup(5) is small and m.lookup(6) is None
    assert m.lookup(N2M) is huge and m.lookup(N2M + 511) is huge and m.lookup(2 * N2M) is None
    assert m.all() == [small, huge]


def test_a_huge_spte_replaces_the_small_ones_inside_it() -> None:
    m = SpteMap(MmuCounters())
    for gfn in (N2M + 1, N2M + 7, 2 * N2M):
        m.install(_spte(gfn), None)
    huge = m.install(_spte(N2M, PG_LEVEL_2M), UNKNOWN)
    assert [s.gfn for s in m.all()] == [N2M, 2 * N2M] and m.lookup(N2M + 7) is huge


def test_a_4k_install_replaces_the_huge_spte_covering_its_gfn() -> None:
    """After a zap split the region's attributes, a 4 KiB fault inside a stale huge SPTE replaces it, whether
    the caller passes the SPTE it looked up or asks for a new lookup."""
    for known in (True, False):
        m = SpteMap(MmuCounters())
        huge = m.install(_spte(0, PG_LEVEL_2M), None)
        small = m.install(_spte(9), huge if known else UNKNOWN)
        assert m.lookup(9) is small and m.lookup(10) is None and [s.gfn for s in m.all()] == [9]


def test_overlapping_finds_a_huge_spte_starting_before_the_range() -> None:
    m = SpteMap(MmuCounters())
    huge = m.install(_spte(N2M, PG_LEVEL_2M), None)
    after = m.install(_spte(2 * N2M + 3), None)
    assert m.overlapping(N2M + 100, N2M + 101) == [huge]
    assert m.overlapping(N2M + 100, 3 * N2M) == [huge, after]
    assert m.overlapping(0, N2M) == [] and m.overlapping(2 * N2M + 4, 3 * N2M) == []


def test_zap_removes_whole_sptes_counts_and_empties_the_index() -> None:
    counters = MmuCounters()
    m = SpteMap(counters)
    m.install(_spte(N2M, PG_LEVEL_2M), None)
    for gfn in range(2 * N2M, 2 * N2M + 4):
        m.install(_spte(gfn), None)
    assert m.zap(N2M + 5, 2 * N2M + 2) == 3  # the 2 MiB SPTE (partly inside) and two 4 KiB ones
    assert [s.gfn for s in m.all()] == [2 * N2M + 2, 2 * N2M + 3]
    assert (counters.zaps, counters.sptes_zapped) == (1, 3)
    assert m.zap(0, 4 * N2M) == 2 and m.all() == [] and m.zap(0, 1) == 0
    assert (counters.zaps, counters.sptes_zapped) == (3, 5)
    assert m._region_keys == [] and m._regions == {}, "emptied regions stay in the index"
    assert m.install(_spte(3 << REGION_SHIFT), None) is m.lookup(3 << REGION_SHIFT)  # the index still works
