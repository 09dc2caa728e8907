"""KVM_SET_MEMORY_ATTRIBUTES on the sim (`kvm_vm_ioctl_set_mem_attributes`) and the range map's cost."""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends.sim import SimSystem, SimVm
from kvmgmem.backends.sim.core.rangemap import RangeMap

from .conftest import GMEM, M2, PRIVATE, P

GPA = 0xC0000000


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    return info.value.errno


def test_2_6_check_order(pvm: SimVm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes` in order: flags, attributes, size/wrap, alignment — each EINVAL."""
    sa = pvm.set_memory_attributes
    assert errno_of(lambda: sa(1, 0, 1 << 5, 1)) == errno.EINVAL  # flags first
    assert errno_of(lambda: sa(1, 0, 1 << 5)) == errno.EINVAL  # unsupported attribute
    assert errno_of(lambda: sa(0, 0, PRIVATE)) == errno.EINVAL  # size 0
    assert errno_of(lambda: sa((1 << 64) - P, P, PRIVATE)) == errno.EINVAL  # address + size wraps to 0
    assert errno_of(lambda: sa(1, P, PRIVATE)) == errno.EINVAL  # unaligned


def test_2_6_default_vm_only_zero(dvm: SimVm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: on a DEFAULT VM only attributes 0 pass (and are a no-op)."""
    assert dvm.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert errno_of(lambda: dvm.set_memory_attributes(0, P, PRIVATE)) == errno.EINVAL
    dvm.set_memory_attributes(0, P, 0)


def test_2_6_not_compiled_enotty(open_sim: Callable[..., SimSystem]) -> None:
    """Host mirror (``sw_protected=False``, like this host): VM_TYPES 1, MEMORY_ATTRIBUTES 0, ioctl ENOTTY."""
    s = open_sim(sw_protected=False)
    assert s.check_extension(uapi.KVM_CAP_VM_TYPES) == 1
    assert s.check_extension(uapi.KVM_CAP_MEMORY_ATTRIBUTES) == 0
    assert errno_of(lambda: s.create_vm(1)) == errno.EINVAL
    with s.create_vm() as vm:
        assert errno_of(lambda: vm.set_memory_attributes(0, P, 0)) == errno.ENOTTY


def test_2_6_step7_noop_does_not_zap(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: setting the current value again returns 0 without an invalidation."""
    pvm.set_user_memory_region(0, GPA, M2, hostmem(M2))
    pvm.set_memory_attributes(GPA, P, 0)
    assert pvm.introspect()["counters"]["invalidations"] == 0
    pvm.set_memory_attributes(GPA, P, PRIVATE)
    pvm.set_memory_attributes(GPA, P, PRIVATE)
    assert pvm.introspect()["counters"]["invalidations"] == 1


def test_2_6_step10_overwrite_not_or(pvm: SimVm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: the value replaces the old one; 0 erases."""
    pvm.set_memory_attributes(GPA, 4 * P, PRIVATE)
    pvm.set_memory_attributes(GPA + P, P, 0)
    assert pvm.introspect()["attributes"] == [(GPA // P, GPA // P + 1, PRIVATE), (GPA // P + 2, GPA // P + 4, PRIVATE)]


def test_2_6_step9_zap_before_store(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`, `kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end`: the zap listener runs
    after the SPTEs are gone and before the new attributes are visible; faults during it retry; the sequence number
    bumps at the end."""
    mem = hostmem(M2)
    with pvm.create_guest_memfd(M2) as g:
        pvm.set_user_memory_region2(0, GPA, M2, mem, GMEM, g, 0)
        assert pvm.sim.handle_fault(GPA).__class__.__name__ == "Mapped"
        seen: list[tuple[int, int, bool, int, str]] = []

        def listener(lo: int, hi: int) -> None:
            core = pvm.sim
            seen.append(
                (
                    lo,
                    hi,
                    core.attributes.is_private(GPA // P),
                    len(core.mmu.sptes()),
                    type(core.handle_fault(GPA)).__name__,
                )
            )

        pvm.add_zap_listener(listener)
        seq = pvm.sim.mmu.seq
        pvm.set_memory_attributes(GPA, P, PRIVATE)
        assert seen == [(GPA // P, GPA // P + 1, False, 0, "Retry")]
        assert pvm.sim.mmu.seq == seq + 1
        assert pvm.sim.attributes.is_private(GPA // P)


def test_2_6_range_outside_slots(pvm: SimVm) -> None:
    """`kvm_vm_ioctl_set_mem_attributes`: no memslot needed; 1 TiB ranges are fine."""
    pvm.set_memory_attributes(0, 1 << 40, PRIVATE)
    pvm.set_memory_attributes(0, 1 << 40, 0)
    assert pvm.introspect()["attributes"] == []


def _best(fn: Callable[[], None], reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def test_design_2_convert_1tib_costs_like_4kib(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """Converting 1 TiB costs within 10x of converting 4 KiB (best of several runs), with a
    memslot covering the range and mappings present, and a fragmented attribute map around it."""
    mem = hostmem(M2)
    pvm.set_user_memory_region(0, 0, M2, mem)
    for i in range(200):  # some unrelated pieces so the map is not trivially small
        pvm.set_memory_attributes((1 << 42) + 2 * i * P, P, PRIVATE)
    for gpa in range(0, M2, 64 * P):
        pvm.sim.handle_fault(gpa)
    base = 1 << 41

    def convert(size: int) -> Callable[[], None]:
        def run() -> None:
            pvm.set_memory_attributes(base, size, PRIVATE)
            pvm.set_memory_attributes(base, size, 0)

        return run

    small = _best(convert(P))
    big = _best(convert(1 << 40))
    assert big < 10 * small, f"1 TiB {big * 1e6:.1f} µs vs 4 KiB {small * 1e6:.1f} µs"


def test_design_2_uniform_range_constant_memory(pvm: SimVm) -> None:
    """A uniform range is one run whatever its size; converting back restores the count."""
    before = len(pvm.sim.attributes)
    pvm.set_memory_attributes(P, 1 << 40, PRIVATE)
    assert len(pvm.sim.attributes) == before + 2
    pvm.set_memory_attributes(P, 1 << 50, PRIVATE)
    assert len(pvm.sim.attributes) == before + 2
    pvm.set_memory_attributes(0, 1 << 60, 0)
    assert len(pvm.sim.attributes) == before


def test_rangemap_against_dict() -> None:
    """The range map agrees with a per-index dict over random updates and stays coalesced."""
    import random

    rnd = random.Random(1)
    rm: RangeMap[int] = RangeMap(0)
    ref = [0] * 200
    for _ in range(2000):
        lo = rnd.randrange(200)
        hi = rnd.randrange(lo, 201)
        v = rnd.randrange(3)
        rm.set(lo, hi, v)
        ref[lo:hi] = [v] * (hi - lo)
        assert [rm.get(i) for i in range(200)] == ref
        runs = rm.runs()
        assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
        a, b = sorted((rnd.randrange(201), rnd.randrange(201)))
        assert rm.is_uniform(a, b) == (len(set(ref[a:b])) <= 1)
        assert rm.count(a, b, 1) == ref[a:b].count(1)
