"""``SpteMap.lookup`` probes one gfn while no huge SPTE exists (it keeps their count): the count must follow
every install, replacement and zap, or a huge SPTE would be missed."""

from __future__ import annotations

from typing import Any

from kvmgmem.backends.sim.core.mmu import MmuCounters
from kvmgmem.backends.sim.core.spte_map import UNKNOWN, Spte, SpteMap

SLOT: Any = object()  # the map never looks into the slot


def _spte(gfn: int, level: int) -> Spte:
    return Spte(gfn, level, SLOT, None, 0, 0x7E0000000000 + gfn * 4096, True, False)


def test_huge_sptes_are_found_while_counted_and_the_count_follows_installs_and_zaps() -> None:
    m = SpteMap(MmuCounters())
    small = m.install(_spte(5, 1), UNKNOWN)
    assert m.lookup(5) is small and m.lookup(6) is None and m._nr_huge == 0
    huge = m.install(_spte(512, 2), UNKNOWN)  # 2 MiB at gfn 512
    assert m._nr_huge == 1 and m.lookup(512 + 300) is huge and m.lookup(5) is small
    giant = m.install(_spte(1 << 18, 3), UNKNOWN)  # 1 GiB at gfn 262144
    assert m._nr_huge == 2 and m.lookup((1 << 18) + 12345) is giant
    m.install(_spte(512 + 7, 1), huge)  # a 4 KiB SPTE replacing the 2 MiB one (what a split would leave)
    assert m._nr_huge == 1 and m.lookup(512 + 300) is None and m.lookup(512 + 7) is not None
    assert m.zap(1 << 18, (1 << 18) + 1) == 1  # zapping any gfn drops the whole 1 GiB SPTE
    assert m._nr_huge == 0 and m.lookup((1 << 18) + 12345) is None
    m.install(_spte(1024, 2), UNKNOWN)
    m.install(_spte(1024, 1), UNKNOWN)  # a 4 KiB install at a huge SPTE's own gfn replaces it
    assert m._nr_huge == 0 and m.lookup(1024 + 5) is None
