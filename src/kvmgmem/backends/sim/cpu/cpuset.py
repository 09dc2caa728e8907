"""The vCPUs of one VM (KVM's ``struct kvm`` as far as vCPUs are concerned): store windows, remote flushes.

Why flushes are numbered: a vCPU that cached nothing in a flushed range is not interrupted by the flush (KVM
only needs to flush TLBs that may hold the zapped SPTEs), so a translation such a vCPU resolves concurrently
must be checked against the flushes that happened meanwhile before it is cached (``stale_since``; see
``resolve.PageResolver.resolved``). The last ``FLUSH_LOG`` flushes are kept with their gfn ranges.
"""

from __future__ import annotations

import collections
import threading

from kvmgmem.backends.sim.cpu.simcpu import SimCpu
from kvmgmem.backends.sim.cpu.stores import StoreMap
from kvmgmem.backends.sim.cpu.tlbcache import CachedRegions
from kvmgmem.backends.sim.cpu.types import GpaResolver

FLUSH_LOG = 256  # recent flushes CpuSet remembers, so a racing fill can tell whether its result is stale


class CpuSet:
    """The vCPUs of one VM, the store windows they share, and VM-wide CPU settings."""

    def __init__(self, resolver: GpaResolver, private_access_bit: int | None = None) -> None:
        self.resolver = resolver
        self.private_access_bit = private_access_bit
        self.stores = StoreMap()
        # replaced, never mutated (under _lock): a flush iterates a snapshot without taking the lock
        self._cpus: tuple[SimCpu, ...] = ()
        self._lock = threading.Lock()
        self.regions = CachedRegions()  # which vCPUs may hold translations where: whom a ranged flush asks
        # Every flush gets a sequence number, logged with its gfn range (None: everything). A vCPU that did
        # not cache any translation in a range is not interrupted by its flush; a translation it resolves
        # concurrently is checked against the log before it is cached (see PageResolver.resolved).
        self._flush_lock = threading.Lock()
        self.flush_seq = 0
        self._flush_log: collections.deque[tuple[int, tuple[int, int] | None]] = collections.deque(maxlen=FLUSH_LOG)

    @property
    def cpus(self) -> list[SimCpu]:
        with self._lock:
            return list(self._cpus)

    def create_cpu(self, vcpu_id: int = 0) -> SimCpu:
        cpu = SimCpu(self, vcpu_id)
        cpu.tlb.regions = self.regions  # before its first fill: from now on it publishes what it caches
        with self._lock:
            self._cpus = (*self._cpus, cpu)
        return cpu

    def forget(self, cpu: SimCpu) -> None:
        """Drop a closed vCPU: flushes and store changes no longer ask it."""
        with self._lock:
            self._cpus = tuple(c for c in self._cpus if c is not cpu)
        self.regions.forget(cpu.requests)

    def add_store(self, host_ptr: int, size: int) -> int:
        """Register a store; returns its window (unicorn physical address of ``host_ptr``)."""
        store = self.stores.add(host_ptr, size)
        self._request_all(None)
        return store.window

    def remove_store(self, host_ptr: int) -> None:
        """Unregister a store; on return no vCPU can access it (the memory may be unmapped)."""
        self.stores.remove(host_ptr)
        self._request_all(None)

    def flush(self, gfn_start: int | None = None, gfn_end: int | None = None) -> None:
        """Flush every vCPU's TLB for ``[gfn_start, gfn_end)`` (everything if None); waits for the acks.

        Only vCPUs that cached a translation in the range are asked (and waited for), as KVM only needs to
        flush TLBs that may hold the zapped SPTEs; the others cannot hold one (every TLB entry comes from a
        cached translation, and a translation resolved across this flush is refused, ``stale_since``). A
        ranged flush looks only at the vCPUs the index has in the range's regions (``CachedRegions``: the
        flush is numbered first, then the index read), each checked precisely under its lock (``post_flush``)."""
        rng = None if gfn_start is None or gfn_end is None else (gfn_start, gfn_end)
        with self._flush_lock:
            self.flush_seq += 1
            self._flush_log.append((self.flush_seq, rng))
        asked = [c.requests for c in self._cpus] if rng is None else self.regions.vcpus_in(*rng)
        tickets = []
        for rq in asked:
            ticket = rq.post_flush(rng)
            if ticket is not None:
                tickets.append((rq, ticket))
        for rq, ticket in tickets:
            rq.wait_ack(ticket)

    def stale_since(self, seq: int, gfn_start: int, gfn_end: int) -> bool:
        """Whether a flush after ``seq`` covered any of ``[gfn_start, gfn_end)`` (or the log lost track)."""
        with self._flush_lock:
            if self.flush_seq == seq:
                return False
            log = self._flush_log
            if not log or log[0][0] > seq + 1:
                return True
            for n, rng in reversed(log):
                if n <= seq:
                    break
                if rng is None or (rng[0] < gfn_end and gfn_start < rng[1]):
                    return True
            return False

    def kick_all(self) -> None:
        for cpu in self.cpus:
            cpu.kick()

    def _request_all(self, flush: tuple[int | None, int | None] | None) -> None:
        tickets = [(cpu, cpu.requests.post_request(flush)) for cpu in self.cpus]
        for cpu, ticket in tickets:
            cpu.requests.wait_ack(ticket)

    def close(self) -> None:
        for cpu in self.cpus:
            cpu.close()
