"""Concurrency stress on the sim: faults against conversions, punches, slot churn and poison.

Faulting threads resolve random gpas through ``SimVm.handle_fault`` (the vCPU's fault entry point) while
other threads convert pages (KVM_SET_MEMORY_ATTRIBUTES), punch and re-allocate guest_memfd pages, delete and
recreate memslots and inject hwpoison. A checker thread snapshots ``introspect()`` continuously and checks
the invariant of docs/reliability.md: no SPTE maps a backing that the attributes, bindings or punched/poisoned pages
forbid. Every thread does a fixed number of operations (no timing decides pass/fail); a watchdog turns a
hang into a failure carrying every thread's stack.
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends import sim
from kvmgmem.backends.sim.cpu.types import Mapped, MemoryFault, Mmio, Retry

from ._support import PRIVATE, P, WatchdogTimeout, run_threads, spte_violations

GMEM = uapi.KVM_MEM_GUEST_MEMFD
NSLOTS, SLOT_PAGES = 4, 128  # gfns [0, 512); file pages [0, 512) of one guest_memfd
UNIVERSE = NSLOTS * SLOT_PAGES + 16  # a few gfns beyond every slot (MMIO / no-slot exits)
FAULTERS, FAULTS_PER_THREAD = 3, 50000
MUTATIONS = 4000  # per mutating thread
SWITCH_INTERVAL = 5e-5  # seconds: make the GIL change hands ~100x more often than by default
WATCHDOG_S = 45.0

STATS: dict[str, int] = {}


def _stress(profile: str, vm_type: int, gmem_flags: int, seed: int) -> dict[str, int]:
    rng0 = random.Random(seed)
    stats = {"faults": 0, "mapped": 0, "exits": 0, "mmio": 0, "retries": 0, "mutations": 0, "checks": 0}
    lock = threading.Lock()
    done = threading.Event()
    violations: list[str] = []
    system = sim.open_system(profile)
    vm = system.create_vm(vm_type)
    mem = HostMemory(NSLOTS * SLOT_PAGES * P)
    gmem = vm.create_guest_memfd(NSLOTS * SLOT_PAGES * P, gmem_flags)
    private_ok = vm.has_private_mem

    def add_slot(i: int, rng: random.Random) -> None:
        # same gpa, a random one of two file windows (the other may be bound: then EINVAL, fine)
        off = (i * SLOT_PAGES + rng.choice([0, 0, SLOT_PAGES]) * rng.randrange(2)) % (NSLOTS * SLOT_PAGES)
        hva = memoryview(mem)[i * SLOT_PAGES * P : (i + 1) * SLOT_PAGES * P]
        try:
            vm.set_user_memory_region2(i, i * SLOT_PAGES * P, SLOT_PAGES * P, hva, GMEM, gmem, off * P)
        except KvmError as e:
            if e.errno not in (22, 17):  # EINVAL (overlapping binding / exists), EEXIST
                raise

    for i in range(NSLOTS):
        add_slot(i, rng0)

    def faulter(k: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed * 100 + k)
            local = {"faults": 0, "mapped": 0, "exits": 0, "mmio": 0, "retries": 0}
            for _ in range(FAULTS_PER_THREAD):
                gpa = rng.randrange(UNIVERSE) * P + rng.randrange(P)
                r = vm.handle_fault(gpa, rng.random() < 0.5, rng.random() < 0.1)
                local["faults"] += 1
                if isinstance(r, Mapped):
                    local["mapped"] += 1
                    # touch the byte like a CPU would: every store stays mapped for the whole run
                    ctypes.string_at(r.host_ptr + (gpa % r.size), 1)
                elif isinstance(r, MemoryFault):
                    local["exits"] += 1
                    assert r.gpa == gpa & ~(P - 1), r
                elif isinstance(r, Mmio):
                    local["mmio"] += 1
                else:
                    assert isinstance(r, Retry), r
                    local["retries"] += 1
            with lock:
                for key, v in local.items():
                    stats[key] += v

        return run

    def mutator(name: str, step: Callable[[random.Random], None], k: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(seed * 1000 + k)
            for _ in range(MUTATIONS):
                step(rng)
                with lock:
                    stats["mutations"] += 1

        return run

    def convert(rng: random.Random) -> None:
        if not private_ok:
            vm.set_memory_attributes(0, UNIVERSE * P, 0)  # the only value a DEFAULT VM accepts
            return
        start = rng.randrange(UNIVERSE)
        n = rng.choice([1, 3, 16, 64, 200])
        vm.set_memory_attributes(start * P, n * P, PRIVATE if rng.random() < 0.6 else 0)

    def punch(rng: random.Random) -> None:
        start, n = rng.randrange(NSLOTS * SLOT_PAGES), rng.choice([1, 2, 8, 40])
        if rng.random() < 0.5:
            gmem.punch_hole(start * P, n * P)
        else:
            n = min(n, NSLOTS * SLOT_PAGES - start)
            gmem.allocate(start * P, n * P)

    def churn(rng: random.Random) -> None:
        i = rng.randrange(NSLOTS)
        try:
            vm.set_user_memory_region2(i, 0, 0)
        except KvmError as e:
            assert e.errno == 22  # already deleted
        add_slot(i, rng)

    def poison(rng: random.Random) -> None:
        page = rng.randrange(NSLOTS * SLOT_PAGES)
        if rng.random() < 0.3:
            gmem.inject_poison(page * P)
        else:
            gmem.punch_hole(page * P, P)  # clears poison marks

    def checker() -> None:
        # Not under run_threads (it runs until the workers finish), so its own failure is caught here and
        # reported like a violation: an exception in a plain thread would otherwise only be printed.
        try:
            while not done.is_set():
                problems = spte_violations(vm.introspect())
                with lock:
                    stats["checks"] += 1
                if problems:
                    violations.extend(problems[:10])
                    return
                time.sleep(0.001)
        except BaseException:
            violations.append(f"checker thread failed:\n{traceback.format_exc()}")

    workers: dict[str, Callable[[], None]] = {f"fault{k}": faulter(k) for k in range(FAULTERS)}
    workers.update(
        {
            "convert": mutator("convert", convert, 1),
            "punch": mutator("punch", punch, 2),
            "churn": mutator("churn", churn, 3),
            "poison": mutator("poison", poison, 4),
        }
    )
    check_thread = threading.Thread(target=checker, name="checker", daemon=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        check_thread.start()
        run_threads(workers, WATCHDOG_S)
    finally:
        sys.setswitchinterval(interval)
        done.set()
        check_thread.join(WATCHDOG_S)
    assert not check_thread.is_alive(), "the checker thread did not stop"
    assert not violations, "invariant violated during the run:\n" + "\n".join(violations)
    final = spte_violations(vm.introspect())
    assert not final, "invariant violated at the end:\n" + "\n".join(final)
    assert vm.sim.mmu.in_progress == 0 and not vm.sim.mmu.ranges, "an invalidation was left in progress"
    inode = gmem.sim.inode
    assert inode.pages_allocated - inode.pages_freed == inode.nr_present, "page accounting out of balance"
    gmem.close()
    vm.close()
    assert vm.sim.destroyed, "VM not destroyed after its fd and its guest_memfd closed"
    mem.close()
    system.close()
    stats["checks"] += 1
    return stats


@pytest.mark.parametrize(
    ("vm_type", "gmem_flags"),
    [
        pytest.param(uapi.KVM_X86_SW_PROTECTED_VM, 0, id="sw_protected-private-gmem"),
        pytest.param(
            uapi.KVM_X86_DEFAULT_VM,
            uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED,
            id="default-gmem_only-slots",
        ),
    ],
)
def test_faults_vs_conversions_punches_slots_poison(vm_type: int, gmem_flags: int) -> None:
    stats = _stress("6.18", vm_type, gmem_flags, seed=vm_type + 7)
    STATS.update({f"{vm_type}:{k}": v for k, v in stats.items()})
    assert stats["faults"] == FAULTERS * FAULTS_PER_THREAD
    assert stats["mutations"] == 4 * MUTATIONS
    assert stats["mapped"] > 0 and stats["exits"] > 0, stats
    assert stats["checks"] >= 2, stats


# --- the watchdog itself -----------------------------------------------------------------------------------


def test_watchdog_reports_a_deadlock_with_every_stack() -> None:
    """Two threads taking two locks in opposite order deadlock; the watchdog fails within its timeout with
    both threads' stacks (naming the function each is stuck in), then releases them."""
    a, b = threading.Lock(), threading.Lock()
    both_hold = threading.Barrier(2)
    release = threading.Event()

    def take(first: threading.Lock, second: threading.Lock) -> Callable[[], None]:
        def deadlocked_worker() -> None:
            with first:
                both_hold.wait()
                while not second.acquire(timeout=0.05):
                    if release.is_set():
                        return
                second.release()

        return deadlocked_worker

    start = time.monotonic()
    with pytest.raises(WatchdogTimeout) as info:
        run_threads({"ab": take(a, b), "ba": take(b, a)}, timeout=0.5, on_timeout=release.set)
    assert time.monotonic() - start < 5
    text = str(info.value)
    assert "threads ['ab', 'ba'] still running" in text
    assert text.count("in deadlocked_worker") >= 2, text
    assert "--- thread ab" in text and "--- thread ba" in text and "--- thread MainThread" in text


def test_watchdog_reports_worker_exceptions() -> None:
    def boom() -> None:
        raise RuntimeError("worker failed")

    with pytest.raises(AssertionError, match="thread boom failed"):
        run_threads({"boom": boom}, timeout=5)


# --- the invariant checker catches what it claims to -----------------------------------------------------


def test_invariant_checker_flags_forbidden_mappings() -> None:
    """Corrupt a real snapshot the ways a broken MMU would: each must be reported."""
    with sim.open_system() as system, system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm:
        with HostMemory(8 * P) as mem, vm.create_guest_memfd(8 * P) as gmem:
            vm.set_user_memory_region2(0, 0, 8 * P, mem, GMEM, gmem, 0)
            vm.set_memory_attributes(0, P, PRIVATE)
            assert isinstance(vm.handle_fault(0, True), Mapped)  # private, gmem page 0
            assert isinstance(vm.handle_fault(P, True), Mapped)  # shared, hva page 1
            snap = vm.introspect()
            assert spte_violations(snap) == []

            def broken(edit: Callable[[dict], None]) -> list[str]:
                import copy

                s = copy.deepcopy(snap)
                edit(s)
                return spte_violations(s)

            assert any("not all present" in v for v in broken(lambda s: s["gmem"][0].update(pages=[])))
            assert any(
                "hwpoison" in v or "not all present" in v
                for v in broken(lambda s: s["gmem"][0].update(pages=[(0, 1, "hwpoison")]))
            )
            assert any("not PRIVATE" in v for v in broken(lambda s: s.update(attributes=[])))
            assert any("over a PRIVATE gfn" in v for v in broken(lambda s: s.update(attributes=[(0, 2, PRIVATE)])))
            assert any("not bound" in v for v in broken(lambda s: s["gmem"][0].update(bindings=[])))
            assert any("not inside" in v for v in broken(lambda s: s.update(memslots=[])))
            vm.set_user_memory_region2(0, 0, 0)
