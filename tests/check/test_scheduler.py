"""The explorer itself: deadlock and lock-order detection, retry livelock, and the serial-order oracle."""

from __future__ import annotations

import threading

from kvmgmem import uapi
from kvmgmem.backends.sim.core.steps import RANK_INVALIDATE_LOCK, RANK_SLOTS_LOCK, KLock, Step, Steps
from kvmgmem.check import SCENARIOS
from kvmgmem.check.scenarios import BASE_GFN, _gmem, _private, _slot, _vm
from kvmgmem.check.scheduler import execute, explore, serial_fingerprints
from kvmgmem.check.world import World, fault_op


def _abba() -> World:
    """Two threads taking two locks in opposite orders (the shape of bug G's mmap_lock/invalidate_lock)."""
    vm = _vm("vm1", frozenset())
    a = KLock("slots_lock", "vm1", RANK_SLOTS_LOCK, threading.Lock())
    b = KLock("invalidate_lock", "gmem", RANK_INVALIDATE_LOCK, threading.Lock())

    def thread(first: KLock, second: KLock) -> Steps[None]:
        yield Step(f"lock {first}", take=(first,))
        yield Step(f"lock {second}", take=(second,))
        yield Step("unlock both", drop=(first, second))

    return World([vm], [("t0", thread(a, b)), ("t1", thread(b, a))])


def test_deadlock_and_lock_order() -> None:
    result = explore(_abba, bound=2)
    kinds = {v.invariant for v in result.violations}
    assert "lock-order" in kinds  # t1 takes slots_lock while holding invalidate_lock
    serial = execute(_abba, [0, 0, 0, 1, 1, 1], stop_on_violation=False)
    assert not serial.deadlock  # serially it completes, but the order is still wrong:
    assert {v.invariant for v in serial.violations} == {"lock-order"}
    deadlocked = execute(_abba, [0, 1], stop_on_violation=False)
    assert deadlocked.deadlock
    assert "deadlock" in {v.invariant for v in deadlocked.violations}


def _stuck() -> World:
    """An invalidation that never ends, covering the gfn a vCPU faults."""
    vm = _vm("vm1", frozenset())
    file, _ = _gmem(vm, 1)
    _slot(vm, 0, BASE_GFN, 1, file)
    _private(vm, BASE_GFN, 1)
    vm.mmu.invalidate_begin()
    vm.mmu.invalidate_range_add(BASE_GFN, BASE_GFN + 1)
    return World([vm], [("vcpu0", fault_op(vm, BASE_GFN))])


def test_retry_forever_is_reported() -> None:
    run = execute(_stuck, [])
    assert "unbounded-retries" in {v.invariant for v in run.violations}


def test_oracle_covers_every_final_state_and_catches_a_missing_order() -> None:
    sc = SCENARIOS["fault_convert"]

    def build() -> World:
        return sc.build(frozenset())

    oracle = serial_fingerprints(build)
    assert len(oracle) == 2  # fault first (then zapped) or conversion first (then a private-access exit)
    clean = explore(build, 2, oracle)
    assert not clean.violations and clean.fingerprints <= oracle and len(clean.fingerprints) == 2
    # drop one serial order: the schedules that end in it are reported as not linearisable
    partial = {next(iter(sorted(oracle, key=repr)))}
    found = explore(build, 2, partial)
    assert [v.invariant for v in found.violations] == ["not-linearisable"]


def test_fault_steps_yield_the_kernel_steps_in_order() -> None:
    vm = _vm("vm1", frozenset())
    file, _ = _gmem(vm, 1)
    _slot(vm, 0, BASE_GFN, 1, file)
    gen = vm.mmu.fault_steps(BASE_GFN << uapi.PAGE_SHIFT)
    labels = []
    try:
        while True:
            labels.append(next(gen).label.split()[0])
    except StopIteration as stop:
        assert stop.value.level == 1
    assert labels == ["F1-F3", "F4", "F5-F7", "F8", "F10-F13"]
    assert vm.srcu_readers == 0
