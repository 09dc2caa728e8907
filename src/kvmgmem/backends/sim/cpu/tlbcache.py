"""A vCPU's translation caches: the paging-structure and data-page caches behind its TLB fills.

Why: a guest page walk in Python costs microseconds per entry, so every page-table page and data page a fill
resolved stays cached per vCPU until a flush drops it (as the hardware's paging-structure caches and KVM's
SPTEs do). The caches are indexed by 2 MiB region of gfns (``REGION_SHIFT``), so a ranged flush costs
O(pages cached in the range) and a flusher can ask whether this vCPU cached anything in a range at all
(``touches``); the engine's own TLB loses the pages installed for the flushed gfns (``tlbpages``). The
store windows mapped
into the engine live here too: a store change is applied, like a flush, at the vCPU's next safe point.

Everything here is called by the vCPU thread, or by a flusher holding the vCPU's request lock
(``requests.VcpuRequests``); this object has no lock of its own.
"""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING

from unicorn import UC_PROT_ALL, UC_PROT_READ, UC_PROT_WRITE

from kvmgmem.backends.sim.cpu.stores import Store, StoreMap
from kvmgmem.backends.sim.cpu.tlbpages import InstalledPages
from kvmgmem.backends.sim.cpu.types import PAGE_SIZE
from kvmgmem.backends.sim.cpu.uc import Engine

if TYPE_CHECKING:
    from kvmgmem.backends.sim.cpu.requests import VcpuRequests

REGION_SHIFT = 9  # cached gfns are indexed by 2 MiB region: range lookups cost O(regions + hits)
IDLE_PUBLISHED = 64  # emptied regions a vCPU may stay published in (CachedRegions) before it leaves them
_HUGE_SIZES = (2 << 20, 1 << 30)


class CachedRegions:
    """VM-wide index: 2 MiB region of gfns (``REGION_SHIFT``) → the vCPUs that may hold a translation there.

    Why: a ranged flush (``cpuset.CpuSet.flush``) need only ask the vCPUs that may have cached something in
    its range, as ``kvm_flush_remote_tlbs`` only needs the TLBs that may hold a zapped SPTE. Asking every vCPU
    cost a request-lock hold and a ``touches`` probe per vCPU per flush (bench 7: 4.5 of the 6 per conversion
    with 4 vCPUs found nothing), all of it under the GIL. With the index a flush costs O(vCPUs that published
    a region of the range); each of those is still checked precisely under its lock (``post_flush``).

    The rule that keeps skipping safe: a vCPU publishes a region (``TranslationCache.publish``) *before* it
    reads ``flush_seq`` to decide whether a translation it resolved may be cached, and a flusher numbers its
    flush *before* it reads the index. So either the flusher sees the vCPU here (and then takes its request
    lock, behind the vCPU's caching), or the vCPU sees the flush's number and refuses the stale translation.
    A vCPU unpublishes a region only under its request lock once it holds nothing there, and lazily (up to
    ``IDLE_PUBLISHED`` emptied regions stay, or until a full flush); a region published with nothing
    cached only costs a flusher the precise check, never a request.

    Sets are mutated under ``_lock``, read without it: a flusher snapshots a region's set in one C call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[int, set[VcpuRequests]] = {}

    def publish(self, region: int, vcpu: VcpuRequests) -> None:
        with self._lock:
            vcpus = self._regions.get(region)
            if vcpus is None:
                self._regions[region] = {vcpu}
            else:
                vcpus.add(vcpu)

    def unpublish(self, regions: list[int], vcpu: VcpuRequests) -> None:
        with self._lock:
            for region in regions:
                self.unpublish_locked(region, vcpu)

    def unpublish_locked(self, region: int, vcpu: VcpuRequests) -> None:
        vcpus = self._regions.get(region)
        if vcpus is not None:
            vcpus.discard(vcpu)
            if not vcpus:
                del self._regions[region]

    def forget(self, vcpu: VcpuRequests) -> None:
        """Drop a closed vCPU from every region (flushes no longer ask it)."""
        with self._lock:
            for region in [r for r, vcpus in self._regions.items() if vcpu in vcpus]:
                self.unpublish_locked(region, vcpu)

    def vcpus_in(self, start: int, end: int) -> tuple[VcpuRequests, ...] | set[VcpuRequests]:
        """The vCPUs published in any region of gfns ``[start, end)``: O(min(regions in range, regions))."""
        first, last = start >> REGION_SHIFT, (end - 1) >> REGION_SHIFT
        regions = self._regions
        if first == last:  # the common case: a range inside one 2 MiB region
            vcpus = regions.get(first)
            return () if vcpus is None else tuple(vcpus)  # one C call: a snapshot despite concurrent publishes
        found: set[VcpuRequests] = set()
        if last - first < len(regions):
            for region in range(first, last + 1):
                found.update(tuple(regions.get(region, ())))
        else:
            for region, vcpus in list(regions.items()):
                if first <= region <= last:
                    found.update(tuple(vcpus))
        return found


class TranslationCache:
    """The per-vCPU caches, valid until the next flush, and the store windows mapped into the engine.

    ``regions``/``owner``: the VM's ``CachedRegions`` and this vCPU's entry in it (None: not indexed, e.g. a
    cache tested on its own); ``published`` is what this vCPU published there."""

    def __init__(self, uc: Engine, stores: StoreMap, regions: CachedRegions | None = None) -> None:
        self._uc = uc
        self.stores = stores
        self.regions = regions
        self.owner: VcpuRequests | None = None  # set by the VcpuRequests built on this cache
        self.published: set[int] = set()  # regions this vCPU published in ``regions``
        self._idle: set[int] = set()  # published regions a ranged flush emptied (maybe refilled since)
        self.pt_cache: dict[int, int] = {}  # gpa page -> host address of that 4 KiB page
        self.pt_entries: dict[int, memoryview] = {}  # the same pages as 512 u64 entries
        # gfns with a pt_cache/data_cache entry, by 2 MiB region (REGION_SHIFT); changed under the request
        # lock, so a flusher can ask (under it) whether this vCPU cached anything in a range
        self.touched: dict[int, set[int]] = {}
        # data translations are keyed by (gpa page, private): with a private access bit the same gpa has a
        # private and a shared translation (None: no such bit, the attribute decides)
        self.data_cache: dict[tuple[int, bool | None], tuple[int, bool]] = {}  # -> (host page, writable)
        # Huge mappings (Mapped.size > 4 KiB) by their aligned gpa: every 4 KiB page inside resolves from here
        # without asking the resolver again (one fault per 2 MiB, as with a huge SPTE).
        self.huge_cache: dict[tuple[int, bool | None], tuple[int, bool, int]] = {}  # -> (host, writable, size)
        self.changing_map = False  # inside sync_stores (see fill.TlbFill.hook_tlb_fill)
        self.mapped: dict[int, Store] = {}  # window -> store mapped into this engine
        self.stores_gen = -1
        self.last_store: Store | None = None  # the store the last fill found (window)
        self.installed = InstalledPages(uc)  # what the engine's TLB holds, per gfn

    def touches(self, start: int, end: int) -> bool:
        """Whether any cached translation (4 KiB page, page-table page or huge mapping) lies in the range."""
        if start >= end:
            return False
        for (gpa, _private), (_host, _w, size) in self.huge_cache.items():
            first = gpa >> 12
            if first < end and start < first + (size >> 12):
                return True
        touched = self.touched
        if not touched:
            return False
        region = start >> REGION_SHIFT
        if region == (end - 1) >> REGION_SHIFT:  # the common case: a range inside one 2 MiB region
            gfns = touched.get(region)
            if not gfns:
                return False
            if end - start < len(gfns):
                return any(g in gfns for g in range(start, end))
            return any(start <= g < end for g in gfns)
        for gfns in self.regions_in(start, end):
            if any(start <= g < end for g in gfns):
                return True
        return False

    def regions_in(self, start: int, end: int) -> list[set[int]]:
        """The touched sets of the regions overlapping [start, end): O(min(regions in range, regions))."""
        touched = self.touched
        first, last = start >> REGION_SHIFT, (end - 1) >> REGION_SHIFT
        if last - first < len(touched):
            return [t for t in (touched.get(r) for r in range(first, last + 1)) if t]
        return [t for r, t in touched.items() if first <= r <= last and t]

    def clear(self, ranges: list[tuple[int, int]] | None = None) -> None:
        """Drop the cached translations in ``ranges`` (all if None) and what the engine's TLB holds of them:
        the pages installed for their gfns and for the huge mappings dropped, or everything when a page-table
        page is in a range (``tlbpages``). Cost O(cached pages in the ranges + regions), not O(cache size ×
        ranges). Caller holds the request lock or is the only thread that can touch this vCPU."""
        installed = self.installed
        if ranges is None:
            installed.flush_all()
            self.huge_cache.clear()
            self.pt_cache.clear()
            self.pt_entries.clear()
            self.data_cache.clear()
            self.touched.clear()
            self._unpublish(list(self.published))
            self._idle.clear()
            return
        vpages: list[int] = []
        emptied: list[int] = []  # regions that may hold nothing any more
        for key in list(self.huge_cache):  # few entries
            first, size = key[0] >> 12, self.huge_cache[key][2] >> 12
            if any(first < e and s < first + size for s, e in ranges):
                del self.huge_cache[key]
                vpages += installed.take(first, first + size)
                emptied += range(first >> REGION_SHIFT, ((first + size - 1) >> REGION_SHIFT) + 1)
        pt, data, pte, touched = self.pt_cache, self.data_cache, self.pt_entries, self.touched
        table = False
        for s, e in ranges:
            vpages += installed.take(s, e)
            for region, gfns in self._touched_in(s, e):
                hit = [g for g in gfns if s <= g < e]
                for g in hit:
                    gpa = g << 12
                    if pt.pop(gpa, None) is not None:
                        table = True
                    pte.pop(gpa, None)
                    data.pop((gpa, None), None)
                    data.pop((gpa, True), None)
                    data.pop((gpa, False), None)
                gfns.difference_update(hit)
                if not gfns:
                    del touched[region]
                    emptied.append(region)
        installed.drop(vpages, table)
        if emptied:
            # Leave the index lazily: a vCPU converting its own page empties and refills one region per
            # conversion, and leaving and rejoining would cost two index-lock holds each time. An idle region
            # only costs a flusher the precise check, and at most IDLE_PUBLISHED of them stay.
            idle = self._idle
            idle.update(emptied)
            if len(idle) > IDLE_PUBLISHED:
                self._unpublish([r for r in idle if r not in touched and not self._huge_covers(r)])
                idle.clear()

    def _touched_in(self, start: int, end: int) -> list[tuple[int, set[int]]]:
        """(region, touched gfns) of the regions overlapping [start, end), like ``regions_in``."""
        touched = self.touched
        first, last = start >> REGION_SHIFT, (end - 1) >> REGION_SHIFT
        if last - first < len(touched):
            return [(r, touched[r]) for r in range(first, last + 1) if r in touched]
        return [(r, t) for r, t in touched.items() if first <= r <= last]

    def _huge_covers(self, region: int) -> bool:
        if not self.huge_cache:
            return False
        lo, hi = region << REGION_SHIFT, (region + 1) << REGION_SHIFT
        return any(g >> 12 < hi and lo < (g >> 12) + (h[2] >> 12) for (g, _p), h in self.huge_cache.items())

    def publish(self, start: int, end: int) -> None:
        """Publish the regions of gfns ``[start, end)`` in the VM's index before caching a translation there:
        called holding the request lock, before the ``flush_seq`` check that decides whether it may be cached
        (``CachedRegions``). Costs a set probe when the region is already published (the common case)."""
        regions, owner = self.regions, self.owner
        if regions is None or owner is None:
            return
        published = self.published
        for region in range(start >> REGION_SHIFT, ((end - 1) >> REGION_SHIFT) + 1):
            if region not in published:
                published.add(region)
                regions.publish(region, owner)

    def _unpublish(self, regions: list[int]) -> None:
        """Leave the index for regions where this vCPU holds nothing any more (request lock held)."""
        gone = [r for r in regions if r in self.published]
        if not gone:
            return
        self.published.difference_update(gone)
        if self.regions is not None and self.owner is not None:
            self.regions.unpublish(gone, self.owner)

    def note_cached(self, gpa_page: int) -> None:
        """Index a newly cached page by region (caller holds the request lock: flushers read the index). The
        region is published too, if it is not already (a caller whose translation was resolved across flushes
        must ``publish`` before its ``flush_seq`` check instead: see ``CachedRegions``)."""
        gfn = gpa_page >> 12
        if gfn >> REGION_SHIFT not in self.published:
            self.publish(gfn, gfn + 1)
        region = self.touched.get(gfn >> REGION_SHIFT)
        if region is None:
            self.touched[gfn >> REGION_SHIFT] = {gfn}
        else:
            region.add(gfn)

    def add_table(self, page: int, host_page: int, live: bool) -> None:
        """Cache a page-table page; its 512-entry view too when ``live`` (no request pending, so the host page
        is memory of a registered store the fast walk may read). Caller holds the request lock."""
        self.pt_cache[page] = host_page
        if live:
            self.pt_entries[page] = memoryview((ctypes.c_uint64 * 512).from_address(host_page)).cast("B").cast("Q")
        self.note_cached(page)  # also when it came from a huge mapping

    def sync_stores(self) -> bool:
        """Map new stores into the engine and unmap removed ones; True if translated code must be dropped
        (a store went, and code translated from it with it)."""
        gen, stores = self.stores.snapshot()
        if gen == self.stores_gen:
            return False
        wanted = {s.window: s for s in stores}
        removed = [w for w in self.mapped if w not in wanted]
        if removed:
            self.clear()
        self.last_store = None
        self.changing_map = True
        try:
            for window in removed:
                store = self.mapped.pop(window)
                self._uc.mem_unmap(window, store.size)
            for window, store in wanted.items():
                if window not in self.mapped:
                    self._uc.mem_map_ptr(window, store.size, UC_PROT_ALL, store.host_ptr)
                    self.mapped[window] = store
        finally:
            self.changing_map = False
        self.stores_gen = gen
        return bool(removed)

    def unmap_all(self) -> None:
        """Unmap every store from the engine (the vCPU is closing; no fill can run any more)."""
        self.changing_map = True
        for window, store in list(self.mapped.items()):
            self._uc.mem_unmap(window, store.size)
        self.mapped.clear()

    def cached(self, gpa_page: int, write: bool, private: bool | None) -> tuple[int, bool] | None:
        """(host page, writable) from the data or huge-mapping cache, if it allows the access."""
        cached = self.data_cache.get((gpa_page, private))
        if cached is not None and (cached[1] or not write):
            return cached
        if not self.huge_cache:  # the common case: no huge mapping cached at all
            return None
        for size in _HUGE_SIZES:
            huge = self.huge_cache.get((gpa_page & ~(size - 1), private))
            if huge is not None and huge[2] == size and (huge[1] or not write):
                return (huge[0] + (gpa_page & (size - 1)), huge[1])
        return None

    def window(self, host_page: int, writable: bool) -> tuple[int, int] | None:
        """(window address, perms) of a data page for the TLB entry; None if no store holds it. Caller holds
        the request lock with the store map synced (``sync_stores`` forgets ``last_store``)."""
        store = self.last_store
        if store is None or not store.host_ptr <= host_page < store.host_ptr + store.size:
            store = self.stores.find(host_page, PAGE_SIZE)
            if store is None:
                return None
            self.last_store = store
        return (store.window + host_page - store.host_ptr, UC_PROT_READ | UC_PROT_WRITE if writable else UC_PROT_READ)
