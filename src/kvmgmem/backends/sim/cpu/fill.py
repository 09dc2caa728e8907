"""The vCPU's TLB-fill hook: our EPT. Unicorn asks it for every TLB miss (per 4 KiB page) in virtual-TLB mode.

Why two paths: a warm refill (unicorn evicted an entry; every table page and the data page are cached) is the
sim's most frequent fill, and the full walk (``memory.GuestMemoryAccess.translate``, ``pagewalk.walk``) with its
callbacks, result objects and per-entry lock costs ~4× the fast one (``fill``, ``fastwalk``). The fast path only
takes the plain case and hands anything else, unchanged, to the full walk (``hook_tlb_fill``), which decides
#PF, exits and caching. A fill that installs nothing records a ``TlbEvent`` and returns False: unicorn stops
at the faulting instruction and the run loop decides (``exits.ExitHandler.tlb_exit``).

Install rule (``requests``): an entry is written only under the request lock with no request pending, and the
vCPU is back in guest mode from then on; a fill that has to call the resolver leaves guest mode first and
drops the lock across the call (the fault may block on VM locks a flusher holds).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from unicorn.unicorn_const import UC_MEM_FETCH, UC_MEM_WRITE

from kvmgmem.backends.sim.cpu.exc import VmExitSignal
from kvmgmem.backends.sim.cpu.fastwalk import fast_walk_py, set_entry, walk_c
from kvmgmem.backends.sim.cpu.memory import PAGE_MASK, GuestMemoryAccess
from kvmgmem.backends.sim.cpu.outcome import DataOutcome, FillOutcome, TlbEvent, emulation_failure
from kvmgmem.backends.sim.cpu.pagewalk import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PTE_ADDR
from kvmgmem.backends.sim.cpu.requests import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, VcpuRequests
from kvmgmem.backends.sim.cpu.resolve import PageResolver
from kvmgmem.backends.sim.cpu.sites import CodeSites
from kvmgmem.backends.sim.cpu.tlbcache import REGION_SHIFT, TranslationCache
from kvmgmem.backends.sim.cpu.types import PAGE_SIZE, FaultResult, Mapped, Retry
from kvmgmem.backends.sim.cpu.uc import Engine, PagingView, TlbEntry

if TYPE_CHECKING:
    from kvmgmem.backends.sim.cpu.cpuset import CpuSet

UC_ACCESS = {16: ACCESS_READ, 17: ACCESS_WRITE, 18: ACCESS_FETCH}  # UC_MEM_READ/WRITE/FETCH


class TlbFill:
    """The fill hook of one vCPU's engine; ``event`` is what the last fill that installed nothing recorded."""

    def __init__(
        self,
        uc: Engine,
        cpuset: CpuSet,
        requests: VcpuRequests,
        cache: TranslationCache,
        pages: PageResolver,
        memory: GuestMemoryAccess,
        sites: CodeSites,
    ) -> None:
        self._uc = uc
        self.cpuset = cpuset
        self._rq = requests
        self._lock = requests.lock
        self._cache = cache
        self._stores = cache.stores
        self._pt_cache = cache.pt_cache  # never rebound: cleared in place
        self._pt_entries = cache.pt_entries
        self._data_cache = cache.data_cache  # never rebound: cleared in place
        self._cached = cache.cached  # bound once: the fast path calls these per fill
        self._window = cache.window
        self._installed = cache.installed  # every install is noted there (tlbpages)
        self._pages = pages
        self._resolver = cpuset.resolver  # its handle_fault is looked up per call (tests replace it)
        self._memory = memory
        self._sites = sites
        self._paging_view = PagingView(uc)
        private_bit = cpuset.private_access_bit
        self._c_bit = 0 if private_bit is None else 1 << private_bit
        self._addr_mask = PTE_ADDR & ~self._c_bit  # frame bits of every entry (pagewalk.walk)
        self.event: TlbEvent | None = None

    def fill(self, _uch: int, vaddr: int, access: int, entry: int, _ud: int) -> bool:
        """The TLB-fill hook (``uc.add_tlb_fill_hook``): a refill the per-vCPU caches can answer is done here,
        in one hold of the request lock with the GIL never released, and everything else takes
        ``hook_tlb_fill``.

        The fast path only takes the plain case — paging on, a data access, every entry present without
        reserved bits, the access allowed — so it can only answer what the full walk would answer the same
        way. A data page missing from the data cache then goes through ``resolve.PageResolver`` exactly as
        ``translate`` does after its walk (first touch, refault, spurious). Holding the lock with
        ``req == ack`` is the slow path's install rule.
        """
        try:
            cache = self._cache
            if access != UC_MEM_FETCH and not cache.changing_map:
                write = access == UC_MEM_WRITE
                rq = self._rq
                with self._lock:
                    if rq.req == rq.ack and not rq.kicked and self._stores.generation == cache.stores_gen:
                        pv = self._paging_view
                        if walk_c is not None:
                            pv.load()
                            walked = walk_c(pv.address, self._pt_cache, vaddr, self._addr_mask, self._c_bit, write)
                        else:
                            walked = fast_walk_py(pv.load(), self._pt_entries, vaddr, self._addr_mask, self._c_bit,
                                                  write)  # fmt: skip
                        if walked is not None:
                            # TranslationCache.cached, its first probe inline (per fill)
                            cached = self._data_cache.get((walked[0], walked[2]))
                            if cached is None or (write and not cached[1]):
                                cached = self._cached(walked[0], write, walked[2]) if cache.huge_cache else None
                            if cached is None:
                                return self._fill_miss(vaddr, access, entry, walked)
                            hit = self._window(cached[0], walked[1] and cached[1])
                            if hit is not None:
                                set_entry(entry, hit[0], hit[1])
                                noted = self._installed.vpages.get(walked[0] >> 12)
                                if noted is None or vaddr & PAGE_MASK not in noted:
                                    self._installed.note(walked[0], vaddr)
                                return True
                            return self._fill_resolve(vaddr, access, entry, walked)
            return self.hook_tlb_fill(self._uc, vaddr, access, TlbEntry.from_address(entry), None)
        except BaseException as e:  # what the binding's hook wrapper does: emu_start re-raises it
            uc = self._uc
            if uc._hook_exception is None:
                uc._hook_exception = e
            uc.emu_stop()
            return False

    def _fill_miss(self, vaddr: int, access: int, entry: int, walked: tuple[int, bool, bool | None]) -> bool:
        """The rest of a fast-path fill whose data page is in no cache: the fault path, then (the common case,
        one 4 KiB mapping the access may use) cache and install. Called holding the request lock and returns
        holding it; the lock is dropped across the resolver only (the fault may block on VM locks a flusher
        holds). The same checks as ``PageResolver.resolve_page`` and ``resolved`` and ``_install_locked``,
        in two holds of the lock instead of four and one frame instead of six (about 0.4 µs of every fault)."""
        rq, lock, cpuset = self._rq, self._lock, self.cpuset
        rq.mode = OUTSIDE_GUEST_MODE  # into "the kernel": requesters need not wait for us
        seq = cpuset.flush_seq  # read before resolving: a flush after this may make the result stale
        rq.in_resolver = True  # may block on VM locks a flusher holds: flushers must not wait for us
        gpa_page, writable, private = walked
        write = access == UC_MEM_WRITE
        lock.release()
        try:
            try:  # PageResolver.call_resolver, inline
                if private is None:  # the three-argument form every GpaResolver understands
                    res = self._resolver.handle_fault(gpa_page, write, False)
                else:
                    res = self._resolver.handle_fault(gpa_page, write, False, private=private)
            except BaseException:
                with rq.cond:
                    rq.in_resolver = False
                raise
            if (
                type(res) is not Mapped
                or res.size != PAGE_SIZE
                or res.host_ptr & (PAGE_SIZE - 1)
                or not (res.writable or not write)
            ):
                try:
                    page = self._pages.resolved(gpa_page, write, private, seq, res)
                except VmExitSignal as sig:
                    return self._fill_outcome(vaddr, access, entry, gpa_page, writable, sig)
                return self._fill_outcome(vaddr, access, entry, gpa_page, writable, page)
        finally:
            lock.acquire()
        host_page, host_writable = res.host_ptr, res.writable
        rq.in_resolver = False
        cache = self._cache
        gfn = gpa_page >> 12
        if gfn >> REGION_SHIFT not in cache.published:  # before the flush_seq check (tlbcache.CachedRegions)
            cache.publish(gfn, gfn + 1)
        outcome: FillOutcome | None
        if seq != cpuset.flush_seq and cpuset.stale_since(seq, gpa_page >> 12, (gpa_page >> 12) + 1):
            outcome = DataOutcome(gpa_page, Retry())
        else:
            cache.data_cache[(gpa_page, private)] = (host_page, host_writable)
            region = cache.touched.get(gfn >> REGION_SHIFT)  # TranslationCache.note_cached
            if region is None:
                cache.touched[gfn >> REGION_SHIFT] = {gfn}
            else:
                region.add(gfn)
            if rq.req != rq.ack:
                outcome = Retry()
            else:  # _install_locked, inline
                hit = self._window(host_page, writable and host_writable)
                if hit is None:
                    outcome = emulation_failure(host_page)
                else:
                    set_entry(entry, hit[0], hit[1])
                    self._installed.note(gpa_page, vaddr)
                    rq.mode = IN_GUEST_MODE
                    if rq.kicked:  # a kick that found us outside guest mode did not stop the engine
                        self._uc.emu_stop()
                    return True
        self.event = (vaddr, UC_ACCESS.get(access, ACCESS_READ), outcome)
        return False

    def _fill_resolve(self, vaddr: int, access: int, entry: int, walked: tuple[int, bool, bool | None]) -> bool:
        """A fast-path fill whose data page is cached but in no store the engine maps (never expected): the
        general path decides. Called holding the request lock, dropped across the resolver."""
        self._rq.mode = OUTSIDE_GUEST_MODE
        gpa_page, writable, private = walked
        self._lock.release()
        try:
            try:
                page = self._pages.resolve_page(gpa_page, access == UC_MEM_WRITE, False, private)
            except VmExitSignal as sig:
                return self._fill_outcome(vaddr, access, entry, gpa_page, writable, sig)
            return self._fill_outcome(vaddr, access, entry, gpa_page, writable, page)
        finally:
            self._lock.acquire()

    def _fill_outcome(
        self,
        vaddr: int,
        access: int,
        entry: int,
        gpa_page: int,
        writable: bool,
        page: tuple[int, bool] | FaultResult | VmExitSignal,
    ) -> bool:
        """Install a resolved page (taking the request lock), or record what the run loop must do instead."""
        outcome: FillOutcome | None
        if isinstance(page, tuple):
            host_page, host_writable = page
            with self._lock:
                if self._rq.req == self._rq.ack:
                    outcome = self._install_locked(entry, host_page, writable and host_writable, gpa_page, vaddr)
                    if outcome is None:
                        return True
                else:
                    outcome = Retry()
        elif isinstance(page, VmExitSignal):
            outcome = page
        else:
            outcome = DataOutcome(gpa_page, page)
        self.event = (vaddr, UC_ACCESS.get(access, ACCESS_READ), outcome)
        return False

    def _install_locked(
        self, entry: int, host_page: int, writable: bool, gpa_page: int, vaddr: int
    ) -> VmExitSignal | None:
        """Point unicorn's TLB ``entry`` for ``vaddr`` at ``host_page``, the page of ``gpa_page`` (caller holds
        the lock, no request pending).

        Returns None once installed — the vCPU is back in guest mode — or the emulation-failure outcome when
        the page lies in no store the engine has mapped (never expected: the resolver returns store pages).
        """
        hit = self._window(host_page, writable)
        if hit is None:
            return emulation_failure(host_page)
        set_entry(entry, hit[0], hit[1])
        self._installed.note(gpa_page, vaddr)
        rq = self._rq
        rq.mode = IN_GUEST_MODE
        if rq.kicked:  # a kick that found us outside guest mode did not stop the engine
            self._uc.emu_stop()
        return None

    def hook_tlb_fill(self, uc: Engine, vaddr: int, access: int, entry: object, _ud: object) -> bool:
        """The full fill: the software walk, the fault path, the code scan of a fetched page, and the install."""
        if self._cache.changing_map:
            # unicorn's own mem_unmap/mem_map_ptr probe addresses through this hook while we hold the lock
            # to change the store map: no guest access is in flight, so there is nothing to translate.
            return False
        acc = UC_ACCESS.get(access, ACCESS_READ)
        rq = self._rq
        with rq.cond:
            rq.mode = OUTSIDE_GUEST_MODE  # in "the kernel" now: requesters need not wait for us
        outcome = self._memory.translate(vaddr, acc)
        if isinstance(outcome, tuple):
            with rq.cond:
                if rq.req == rq.ack:
                    paddr, perms, host_page, gpa_page = outcome
                    if acc != ACCESS_FETCH or not self.scan_code(vaddr & PAGE_MASK, host_page):
                        entry.paddr, entry.perms = paddr, perms  # type: ignore[attr-defined]
                        self._installed.note(gpa_page, vaddr)
                        rq.mode = IN_GUEST_MODE
                        if rq.kicked:  # a kick that found us outside guest mode did not stop the engine
                            uc.emu_stop()
                        return True
                    # an instruction being translated may run into this page, and its site was decided on
                    # other bytes: translate again with the site pending (sites.CodeSites.scan)
                    rq.code_stale = True
            outcome = Retry()
        self.event = (vaddr, acc, outcome)
        return False

    def scan_code(self, vpage: int, host_page: int) -> bool:
        """Hook the sites where an exit must be precise (``sites``) before unicorn translates code on
        ``vpage``; True if translated code must go first (``CodeSites.scan``). Caller holds the request lock
        with no request pending, so ``host_page`` is live memory of a registered store."""
        return self._sites.scan(vpage, ctypes.string_at(host_page, PAGE_SIZE))
