"""Remote TLB flushes that scale (issue 15): ranged flushes drop exactly their range, an idle vCPU's pending
flushes stay bounded, and vCPUs that cached nothing in a range are skipped without ever using a stale
translation (a fill that resolved a page before its zap is refused and retried)."""

from __future__ import annotations

import struct

from kvmgmem.backends.sim.cpu import MAX_PENDING_RANGES, SimCpu
from kvmgmem.backends.sim.cpu.types import Mapped
from kvmgmem.exits import IoExit
from kvmgmem.hostmem import HostMemory

from .simcpu_guest import CODE, DATA, Asm, C, Guest, I, R, mem_op


def _cached_gfns(cpu: SimCpu) -> set[int]:
    return {key[0] >> 12 for key in cpu.tlb.data_cache}


def test_ranged_flush_drops_exactly_its_range(guest: Guest) -> None:
    cpu = guest.cpu()
    for gfn in range(64, 96):
        cpu.pages.resolve_page(gfn << 12, False, False)
    assert _cached_gfns(cpu) >= set(range(64, 96))
    guest.cpuset.flush(70, 72)
    guest.cpuset.flush(90, 91)
    with cpu.requests.cond:
        cpu.requests.service_locked()
    cached = _cached_gfns(cpu)
    assert not cached & {70, 71, 90}
    assert cached >= set(range(64, 70)) | set(range(72, 90)) | set(range(91, 96))


def test_flush_skips_a_vcpu_that_cached_nothing_in_the_range(guest: Guest) -> None:
    cpu = guest.cpu()
    cpu.pages.resolve_page(64 << 12, False, False)
    req = cpu.requests.req
    guest.cpuset.flush(200, 300)  # nothing cached there: no request, nothing to wait for
    assert cpu.requests.req == req
    guest.cpuset.flush(64, 65)
    assert cpu.requests.req == req + 1


def test_pending_flushes_of_an_idle_vcpu_stay_bounded(guest: Guest) -> None:
    cpu = guest.cpu()
    for gfn in range(0, 4096, 2):
        cpu.pages.resolve_page(gfn << 12, False, False)
    for gfn in range(0, 4096, 2):  # one zap each, never adjacent: no merging
        guest.cpuset.flush(gfn, gfn + 1)
    assert len(cpu.requests.flush_ranges) <= MAX_PENDING_RANGES
    assert cpu.requests.flush_all  # degraded to one full flush
    for gfn in range(10):  # adjacent or overlapping ranges merge
        cpu.requests.post_request((1000 + gfn, 1001 + gfn))
    with cpu.requests.cond:
        cpu.requests.service_locked()
    assert not cpu.tlb.data_cache and not cpu.requests.flush_ranges and not cpu.requests.flush_all


def test_fill_resolved_before_a_zap_is_refused_and_retried(guest: Guest) -> None:
    """The zap lands while the vCPU is inside the resolver for that very page: the vCPU has nothing cached
    there, so the flush skips it, and the result it then returns (the old backing) must not be used."""
    other = HostMemory(4096)
    struct.pack_into("<Q", other, 0, 0x1234)
    guest.cpuset.add_store(other.address, 4096)
    guest.set_u64(DATA, 0x5555)
    real = guest.resolver.handle_fault
    zapped = []

    def racing(gpa: int, write: bool, fetch: bool) -> object:
        result = real(gpa, write, fetch)
        if gpa >> 12 == DATA >> 12 and not zapped:
            zapped.append(gpa)
            guest.resolver.map[DATA >> 12] = other.address  # the zap: new backing for the gfn ...
            guest.cpuset.flush(DATA >> 12, (DATA >> 12) + 1)  # ... and its flush, racing with this fill
            assert isinstance(result, Mapped)
        return result  # the old backing: stale by now

    guest.resolver.handle_fault = racing  # type: ignore[method-assign]
    try:
        a = Asm()(I.create_reg_mem(C.MOV_R64_RM64, R.RAX, mem_op(DATA))).out(0x10)
        guest.load(a)
        cpu = guest.cpu(CODE)
        ex = cpu.run()
        assert zapped
        assert isinstance(ex, IoExit) and ex.value == 0x1234  # read through the new backing only
    finally:
        guest.resolver.handle_fault = real  # type: ignore[method-assign]
        guest.cpuset.close()
        guest.cpuset.remove_store(other.address)
        other.close()
