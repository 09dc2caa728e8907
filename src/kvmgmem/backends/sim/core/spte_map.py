"""The SPTE map of one VM: the model's TDP page table (``arch/x86/kvm/mmu/tdp_mmu.c``'s role).

Why a map of its own: it is the one structure both halves of the MMU touch — the fault path installs into it
(``kvm_tdp_mmu_map``) and every invalidation zaps from it (``kvm_tdp_mmu_unmap_gfn_range``) — and the one tests
inspect to prove nothing maps what it may not. It knows nothing of locks, memslots or attributes: callers hold
``mmu_lock`` (``Mmu.lock``) around every call, as the kernel does around its SPTE writes.

A mapping is one ``Spte`` at its first gfn: 4 KiB, 2 MiB or 1 GiB (``level`` 1..3). A second index by 2 MiB
region keeps range queries proportional to what they touch rather than to the whole map (bench 4c: zapping one
SPTE costs the same with 1k or 262k SPTEs present).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .gmem import GmemInode
from .memslots import Memslot
from .profile import PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K, level_pages

if TYPE_CHECKING:
    from .mmu import MmuCounters

REGION_SHIFT = 9  # SPTE index buckets: 2 MiB of gfns
_PAGES_2M = level_pages(PG_LEVEL_2M)
_PAGES_1G = level_pages(PG_LEVEL_1G)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: a frozen __init__ costs ~5× (per fault)
class Spte:
    """One installed mapping: ``npages`` gfns from ``gfn`` to host memory from ``host_address``."""

    gfn: int
    level: int
    slot: Memslot
    gmem: GmemInode | None  # None: served from the slot's userspace_addr
    pgoff: int  # first guest_memfd page index (gmem) — unused for hva mappings
    host_address: int
    writable: bool
    private: bool  # the fault that installed it was private

    @property
    def npages(self) -> int:
        return level_pages(self.level)

    @property
    def end_gfn(self) -> int:
        return self.gfn + self.npages

    @property
    def backing(self) -> str:
        return "gmem" if self.gmem is not None else "hva"


class Unknown:
    """``SpteMap.install``'s "look the old SPTE up again" marker (None already means "no SPTE")."""


UNKNOWN = Unknown()


class SpteMap:
    """SPTEs of one VM (address space 0), by first gfn, with the 2 MiB region index."""

    def __init__(self, counters: MmuCounters) -> None:
        self._sptes: dict[int, Spte] = {}
        # The SPTEs' first gfns by 2 MiB region (gfn >> REGION_SHIFT), and the occupied regions sorted: a range
        # query costs O(log regions + regions and SPTEs touched), and an install or a zap never shifts a list
        # of every SPTE (a sorted list of gfns did: zapping half of 262k SPTEs one delete at a time took 2 s).
        self._regions: dict[int, set[int]] = {}
        self._region_keys: list[int] = []
        #: The MMU's counters: a zap counts itself here (no wrapper call between the MMU and the map).
        self.counters = counters

    def lookup(self, gfn: int) -> Spte | None:
        """The SPTE mapping ``gfn`` (any level): at ``gfn`` rounded down to 4 KiB, 2 MiB, 1 GiB."""
        sptes = self._sptes
        s = sptes.get(gfn)
        if s is not None and s.level == PG_LEVEL_4K:
            return s
        s = sptes.get(gfn & ~(_PAGES_2M - 1))
        if s is not None and s.level == PG_LEVEL_2M:
            return s
        s = sptes.get(gfn & ~(_PAGES_1G - 1))
        if s is not None and s.level == PG_LEVEL_1G:
            return s
        return None

    def all(self) -> list[Spte]:
        """Every SPTE, by gfn."""
        sptes, regions = self._sptes, self._regions
        return [sptes[g] for r in self._region_keys for g in sorted(regions[r])]

    def overlapping(self, lo: int, hi: int) -> list[Spte]:
        """SPTEs intersecting ``[lo, hi)``, in O(log regions + regions and SPTEs touched): only a huge SPTE
        can start before ``lo`` and still cover it, and it then starts at ``lo`` rounded down to its level,
        so two lookups find those; the rest start inside the range and come from its regions."""
        out: list[Spte] = []
        sptes = self._sptes
        for level in (PG_LEVEL_1G, PG_LEVEL_2M):
            n = level_pages(level)
            base = lo - lo % n
            if base < lo:
                s = sptes.get(base)
                if s is not None and s.level == level and s.end_gfn > lo:
                    out.append(s)
        if hi <= lo:
            return out
        keys, regions = self._region_keys, self._regions
        i = bisect_left(keys, lo >> REGION_SHIFT)
        last = (hi - 1) >> REGION_SHIFT
        n_keys = len(keys)
        while i < n_keys and keys[i] <= last:
            r = keys[i]
            gfns = regions[r]
            start, end = max(lo, r << REGION_SHIFT), min(hi, (r + 1) << REGION_SHIFT)
            if end - start == 1 << REGION_SHIFT:
                out.extend(sptes[g] for g in gfns)  # the whole region is inside the range
            elif end - start < len(gfns):
                out.extend(sptes[g] for g in range(start, end) if g in gfns)  # a few gfns of a full region
            else:
                out.extend(sptes[g] for g in gfns if start <= g < end)
            i += 1
        return out

    def _add(self, s: Spte) -> None:
        self._sptes[s.gfn] = s
        r = s.gfn >> REGION_SHIFT
        gfns = self._regions.get(r)
        if gfns is None:
            self._regions[r] = {s.gfn}
            insort(self._region_keys, r)  # one per new 2 MiB region, not per SPTE
        else:
            gfns.add(s.gfn)

    def _remove(self, s: Spte) -> None:
        del self._sptes[s.gfn]
        r = s.gfn >> REGION_SHIFT
        gfns = self._regions[r]
        gfns.discard(s.gfn)
        if not gfns:
            del self._regions[r]
            del self._region_keys[bisect_left(self._region_keys, r)]

    def zap(self, lo: int, hi: int) -> int:
        """Drop every SPTE intersecting ``[lo, hi)`` (whole huge SPTEs), as ``kvm_tdp_mmu_unmap_gfn_range``
        does; returns how many. Cost O(log regions + regions and SPTEs touched): emptied regions leave the
        sorted keys in one splice."""
        victims = self.overlapping(lo, hi)
        if victims:
            sptes, regions = self._sptes, self._regions
            emptied = False
            for s in victims:
                del sptes[s.gfn]
                gfns = regions[s.gfn >> REGION_SHIFT]
                gfns.discard(s.gfn)
                emptied = emptied or not gfns
            if emptied:
                keys = self._region_keys
                first = min(lo, victims[0].gfn) >> REGION_SHIFT
                i, j = bisect_left(keys, first), bisect_left(keys, ((hi - 1) >> REGION_SHIFT) + 1)
                for r in keys[i:j]:
                    if not regions[r]:
                        del regions[r]
                keys[i:j] = [r for r in keys[i:j] if r in regions]
        self.counters.zaps += 1
        self.counters.sptes_zapped += len(victims)
        return len(victims)

    def install(self, spte: Spte, old: Spte | Unknown | None) -> Spte:
        """``kvm_tdp_mmu_map``'s SPTE write of ``spte``. ``old``: the SPTE covering its gfn when the caller
        knows it is still the current one (looked up under this same hold of ``mmu_lock``), else ``UNKNOWN``."""
        if spte.level == PG_LEVEL_4K:  # replaces at most the one SPTE covering the gfn (cheaper than a scan)
            if isinstance(old, Unknown):
                old = self.lookup(spte.gfn)
            if old is not None:
                self._remove(old)
        else:
            for s in self.overlapping(spte.gfn, spte.end_gfn):  # smaller SPTEs replaced by a huge one
                self._remove(s)
        self._add(spte)
        return spte
