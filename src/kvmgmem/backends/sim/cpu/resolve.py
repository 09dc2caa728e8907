"""A vCPU's side of a TDP fault: gpa page → host page through the VM's resolver, cached until a flush.

Why here and not in the VM: the resolver (``types.GpaResolver``, the VM's ``handle_fault``) is the expensive
part of a fill and may block on VM locks, so the vCPU asks it once per page and keeps the answer in its
translation caches (``tlbcache``). Two rules make that safe against a concurrent zap. The vCPU is marked
``in_resolver`` while it calls out, so a flusher holding a VM lock never waits for it (it could be blocked on
that lock). And a flusher skips vCPUs that cached nothing in its range, so an answer is cached only if no
flush numbered since the resolution began covered it (``CpuSet.stale_since``); otherwise the access retries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmgmem.backends.sim.cpu.outcome import emulation_failure
from kvmgmem.backends.sim.cpu.requests import VcpuRequests
from kvmgmem.backends.sim.cpu.tlbcache import TranslationCache
from kvmgmem.backends.sim.cpu.types import PAGE_SIZE, FaultResult, GpaResolver, Mapped, Mmio, Retry

if TYPE_CHECKING:
    from kvmgmem.backends.sim.cpu.cpuset import CpuSet


class PageResolver:
    """Resolves and caches the data and page-table pages of one vCPU (``kvm_mmu_page_fault``'s caller side)."""

    def __init__(self, cpuset: CpuSet, requests: VcpuRequests, cache: TranslationCache) -> None:
        self.cpuset = cpuset
        self._resolver: GpaResolver = cpuset.resolver
        self._rq = requests
        self._cache = cache

    def resolve_page(
        self, gpa_page: int, write: bool, fetch: bool, private: bool | None = None, entered: int | None = None
    ) -> tuple[int, bool] | FaultResult:
        """(host page, writable) for ``gpa_page``, from the caches or the resolver; else the resolver's answer.

        ``private`` None: the resolver decides from the attribute (page-table reads, no private bit).
        ``entered``: the caller (the fill fast path) already missed the caches, read ``cpuset.flush_seq``
        (passed here) and set ``in_resolver``, all in its own hold of the request lock; this saves a hold."""
        if entered is None:
            cached = self._cache.cached(gpa_page, write, private)
            if cached is not None:
                return cached
            seq = self.cpuset.flush_seq  # read before resolving: a flush after this may make the result stale
            with self._rq.cond:
                self._rq.in_resolver = True  # may block on VM locks a flusher holds: flushers must not wait
        else:
            seq = entered
        return self.resolved(gpa_page, write, private, seq, self.call_resolver(gpa_page, write, fetch, private))

    def call_resolver(self, gpa_page: int, write: bool, fetch: bool, private: bool | None) -> FaultResult:
        """The VM's fault handler, entered with ``in_resolver`` set (cleared here if it raises)."""
        try:
            if private is None:  # the three-argument form every GpaResolver understands
                return self._resolver.handle_fault(gpa_page, write, fetch)
            return self._resolver.handle_fault(gpa_page, write, fetch, private=private)
        except BaseException:
            with self._rq.cond:
                self._rq.in_resolver = False
            raise

    def resolved(
        self, gpa_page: int, write: bool, private: bool | None, seq: int, res: FaultResult
    ) -> tuple[int, bool] | FaultResult:
        """What ``resolve_page`` makes of the resolver's answer: cache it unless a flush since ``seq`` made it
        stale, and clear ``in_resolver``."""
        rq = self._rq
        if not isinstance(res, Mapped):
            with rq.cond:
                rq.in_resolver = False
            return res
        size, host, writable = res.size, res.host_ptr, res.writable
        base = gpa_page & ~(size - 1)
        bad = size < PAGE_SIZE or size & (size - 1) or host & (PAGE_SIZE - 1)
        usable = not bad and (writable or not write)
        result = (host + (gpa_page & (size - 1)), writable)
        cpuset = self.cpuset
        with rq.lock:  # cond's lock, taken directly (once per fault)
            rq.in_resolver = False
            if usable:
                self._cache.publish(base >> 12, (base + size) >> 12)  # before the flush_seq check (CachedRegions)
            # A flusher that skipped this vCPU (nothing cached in its range) relies on this check: a result
            # resolved before a zap of its gfns is never cached nor installed. With no flush numbered since
            # ``seq`` (read unlocked: a flush numbered after this read sees what we cache under this lock, as
            # post_flush takes it) nothing can be stale.
            stale = usable and cpuset.flush_seq != seq and cpuset.stale_since(seq, base >> 12, (base + size) >> 12)
            if usable and not stale:
                if size > PAGE_SIZE:
                    self._cache.huge_cache[(base, private)] = (host, writable, size)
                else:
                    self._cache.data_cache[(gpa_page, private)] = result
                    self._cache.note_cached(gpa_page)
        if bad:
            raise emulation_failure(gpa_page)  # a resolver bug; refusing beats dereferencing garbage
        if write and not writable:
            return Mmio()  # a write the backing refuses is an MMIO write (read-only memslot)
        if stale:
            return Retry()
        return result
