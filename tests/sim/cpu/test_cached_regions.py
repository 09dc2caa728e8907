"""The VM-wide index of which vCPUs may hold translations where (``tlbcache.CachedRegions``, issue 15).

Why: a ranged flush asks only the vCPUs the index names for its range; a vCPU missing there is never asked,
so it must never hold a translation in the range once the flush returns. Checked here: a vCPU that cached the
range is asked and drops it, one that did not is not even kicked, a vCPU leaves a region once it holds
nothing there, huge mappings keep their regions, and a translation that races the flush is either found by
the flusher or refused (the vCPU publishes before its ``flush_seq`` check).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from kvmgmem.backends.sim.cpu import CpuSet
from kvmgmem.backends.sim.cpu.tlbcache import IDLE_PUBLISHED, REGION_SHIFT, CachedRegions
from kvmgmem.backends.sim.cpu.types import Mapped, Retry

from .simcpu_guest import FakeResolver, Guest

REGION = 1 << REGION_SHIFT  # gfns per indexed region


def test_index_publish_unpublish_and_range_lookup() -> None:
    index = CachedRegions()
    a, b = object(), object()
    index.publish(0, a)  # type: ignore[arg-type]
    index.publish(3, b)  # type: ignore[arg-type]
    index.publish(3, a)  # type: ignore[arg-type]
    assert set(index.vcpus_in(5, 6)) == {a}
    assert set(index.vcpus_in(3 * REGION, 3 * REGION + 1)) == {a, b}
    assert set(index.vcpus_in(REGION, 3 * REGION)) == set()  # regions 1 and 2: nobody
    assert set(index.vcpus_in(0, 10 * REGION)) == {a, b}
    assert set(index.vcpus_in(0, 1 << 40)) == {a, b}  # more regions in range than indexed
    index.unpublish([3], a)  # type: ignore[arg-type]
    assert set(index.vcpus_in(3 * REGION, 3 * REGION + 1)) == {b}
    index.forget(b)  # type: ignore[arg-type]
    assert set(index.vcpus_in(0, 1 << 40)) == {a}


def test_a_flush_asks_the_vcpu_that_cached_the_range_and_never_kicks_the_other(guest: Guest) -> None:
    busy, idle = guest.cpu(), guest.cpu()
    busy.pages.resolve_page(64 << 12, False, False)
    idle.pages.resolve_page((REGION + 5) << 12, False, False)  # another region only
    assert set(guest.cpuset.regions.vcpus_in(64, 65)) == {busy.requests}
    idle_req, busy_req = idle.requests.req, busy.requests.req
    idle.requests.lock.acquire()  # a flusher that touched the idle vCPU's request lock would hang here
    try:
        guest.cpuset.flush(64, 65)
    finally:
        idle.requests.lock.release()
    assert idle.requests.req == idle_req and busy.requests.req == busy_req + 1
    with busy.requests.cond:
        busy.requests.service_locked()
    assert (64 << 12, None) not in busy.tlb.data_cache
    # nothing left there: the next flush may still look (the vCPU leaves emptied regions lazily) but
    # requests nothing
    guest.cpuset.flush(64, 65)
    assert busy.requests.req == busy_req + 1


def test_emptied_regions_leave_the_index_past_the_bound(guest: Guest) -> None:
    cpu = guest.cpu()
    regions = range(IDLE_PUBLISHED + 1)
    for r in regions:
        cpu.tlb.data_cache[((r * REGION) << 12, None)] = (guest.mem.address, True)
        with cpu.requests.cond:
            cpu.tlb.note_cached((r * REGION) << 12)
    assert set(guest.cpuset.regions.vcpus_in(0, len(regions) * REGION)) == {cpu.requests}
    for r in regions:
        guest.cpuset.flush(r * REGION, r * REGION + 1)
        with cpu.requests.cond:
            cpu.requests.service_locked()
    assert not cpu.tlb.data_cache
    assert not guest.cpuset.regions.vcpus_in(0, len(regions) * REGION) and not cpu.tlb.published


def test_a_region_stays_published_while_anything_is_cached_there(guest: Guest) -> None:
    cpu = guest.cpu()
    cpu.pages.resolve_page(64 << 12, False, False)
    cpu.pages.resolve_page(65 << 12, False, False)
    guest.cpuset.flush(64, 65)
    with cpu.requests.cond:
        cpu.requests.service_locked()
    assert set(guest.cpuset.regions.vcpus_in(64, 65)) == {cpu.requests}  # gfn 65 still cached there
    req = cpu.requests.req
    guest.cpuset.flush(64, 65)  # asked (indexed), but the precise check finds nothing: no request
    assert cpu.requests.req == req
    guest.cpuset.flush()  # a full flush empties everything and the index with it
    with cpu.requests.cond:
        cpu.requests.service_locked()
    assert not guest.cpuset.regions.vcpus_in(0, 1 << 40) and not cpu.tlb.published


def test_a_huge_mapping_publishes_every_region_it_covers() -> None:
    class HugeResolver(FakeResolver):
        """Every gfn of the 4 MiB store as one 4 MiB mapping: two indexed regions."""

        def handle_fault(self, gpa: int, write: bool, fetch: bool) -> Any:
            return Mapped(guest.mem.address, 4 << 20, True)

    guest = Guest()
    try:
        guest.cpuset.resolver = HugeResolver()
        cpu = guest.cpuset.create_cpu(0)
        cpu.pages.resolve_page(3 << 12, False, False)
        assert cpu.tlb.huge_cache
        assert set(guest.cpuset.regions.vcpus_in(REGION + 7, REGION + 8)) == {cpu.requests}  # 2nd 2 MiB
        assert cpu.tlb.published == {0, 1}
        guest.cpuset.flush(REGION + 7, REGION + 8)
        with cpu.requests.cond:
            cpu.requests.service_locked()
        assert not cpu.tlb.huge_cache
        req = cpu.requests.req
        guest.cpuset.flush(5, 6)  # the first region: nothing cached there any more, nothing requested
        assert cpu.requests.req == req
    finally:
        guest.close()


class _RacingCpuSet(CpuSet):
    """Runs a flush of ``gfn`` on another thread exactly when a vCPU checks ``flush_seq`` before caching: the
    vCPU reads the old number, the flush numbers itself and reads the index right after."""

    gfn = -1  # armed when >= 0: the vCPU's second read (the check after resolving) starts the flush
    reads = 0
    flusher: threading.Thread | None = None
    _seq = 0

    @property
    def flush_seq(self) -> int:
        seq = self._seq
        if self.gfn >= 0 and self.flusher is None and threading.current_thread() is threading.main_thread():
            self.reads += 1
            if self.reads == 2:
                self.flusher = threading.Thread(target=self.flush, args=(self.gfn, self.gfn + 1))
                self.flusher.start()
                time.sleep(0.1)  # the flusher numbered its flush and read the index (or waits for our lock)
        return seq

    @flush_seq.setter
    def flush_seq(self, value: int) -> None:
        self._seq = value


def test_a_translation_racing_a_flush_is_either_flushed_or_refused() -> None:
    guest = Guest()
    try:
        racing = _RacingCpuSet(guest.resolver)
        racing.add_store(guest.mem.address, 4 << 20)
        cpu = racing.create_cpu(0)
        racing.gfn = 64
        res = cpu.pages.resolve_page(64 << 12, False, False)
        assert racing.flusher is not None
        racing.flusher.join(5)
        cached = (64 << 12, None) in cpu.tlb.data_cache
        pending = any(s <= 64 < e for s, e in cpu.requests.flush_ranges) or cpu.requests.flush_all
        assert isinstance(res, Retry) or (cached and pending)  # never cached with nobody told to drop it
        with cpu.requests.cond:
            cpu.requests.service_locked()
        assert (64 << 12, None) not in cpu.tlb.data_cache
        racing.close()
    finally:
        guest.close()
