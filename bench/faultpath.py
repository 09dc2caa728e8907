"""Bench 8: the sim's fault path as a guest sees it — µs per 4 KiB page, one row per kind of TLB fill.

A CPL3 guest on a KVM_X86_SW_PROTECTED_VM reads the first byte of every page of a ``SIZE`` guest_memfd slot
(attributes PRIVATE), between two SYNC ucalls; the host takes the thread CPU time of the window (the vCPU
runs on the calling thread) and divides by the pages. Each
kind is a pass over the same pages:

* **first touch** — the first pass: every fill walks the guest tables, faults into the core and allocates
  the gmem page.
* **warm refill** — the next passes: the SPTEs and the vCPU's translation caches are warm, but unicorn's
  TLB (256 entries, direct mapped) cannot hold ``SIZE`` pages, so every page is filled again.
* **refault after zap** — after converting the range to shared and back (two zaps and flushes): every
  fill is a real fault on an allocated page.
* **spurious** — a second vCPU touches the pages vCPU 0 mapped: its caches are cold, the SPTE exists.

Bounded below by the ctypes callback plus unicorn's own fill (~0.75 µs, README). Targets (issue 15): warm
refill ≤ 3 µs, first touch ≤ 10 µs, refault after zap ≤ 8 µs.
"""

from __future__ import annotations

import time

from common import Report, Row

import kvmgmem
from kvmgmem import uapi
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U

GPA = 1 << 30
SIZE = 32 << 20  # 8,192 pages: far more than unicorn's TLB holds
PASSES = 3
#: Fresh VMs measured: first touch and spurious happen once per VM, so each is best of VMS (a single pass was
#: 8-13 µs from run to run inside bench/run.py, 8.1 ± 0.05 standalone).
VMS = 3
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
TARGETS = {"warm refill": 3.0, "first touch (private, allocates)": 10.0, "refault after zap": 8.0}


def payload() -> Asm:
    a = Asm()
    for _ in range(2 + 2 * PASSES):  # unrolled passes: one SYNC before each, one after the last
        U.sync(a)
        R.touch_pages(a, GPA, SIZE, value=None)
    U.sync(a)
    U.done(a)
    return a


def _timed(gv: object) -> float:
    """Thread CPU seconds of one pass: the vCPU runs on this thread (fills, faults, flush servicing all
    happen here), and CPU time is what stays comparable on a loaded 2-core host."""
    t0 = time.thread_time()
    gv.expect_sync(timeout=300)  # type: ignore[attr-defined]
    return time.thread_time() - t0


def measure() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first touch (private, allocates)": [], "warm refill": [],
                                   "refault after zap": [], "spurious (SPTE present, vCPU cold)": []}  # fmt: skip
    for _ in range(VMS):
        _measure_vm(out)
    return out


def _measure_vm(out: dict[str, list[float]]) -> None:
    """One fresh VM's passes, appended to ``out``."""
    pages = SIZE // uapi.PAGE_SIZE
    with kvmgmem.open("sim") as system:
        vm = system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM)
        gmem = vm.create_guest_memfd(SIZE, 0)
        try:
            with GuestVm(vm, GuestImage(payload(), user=True, nvcpus=2)) as g:
                g.vm.set_user_memory_region2(1, GPA, SIZE, None, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
                vm.set_memory_attributes(GPA, SIZE, PRIVATE)
                v0, v1 = g.create_vcpu(), g.create_vcpu()
                v0.expect_sync()
                out["first touch (private, allocates)"].append(_timed(v0) / pages)
                for _ in range(PASSES):
                    out["warm refill"].append(_timed(v0) / pages)
                for _ in range(PASSES):
                    vm.set_memory_attributes(GPA, SIZE, 0)
                    vm.set_memory_attributes(GPA, SIZE, PRIVATE)
                    out["refault after zap"].append(_timed(v0) / pages)
                v1.expect_sync()
                out["spurious (SPTE present, vCPU cold)"].append(_timed(v1) / pages)
                vm.set_user_memory_region2(1, GPA, 0, None, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
        finally:
            gmem.close()


def run(report: Report) -> None:
    bench = "8 sim fault path via the guest (4 KiB)"
    times = measure()
    for kind, secs in times.items():
        best = min(secs) * 1e6
        target = TARGETS.get(kind)
        spread = ", ".join(f"{s * 1e6:.1f}" for s in secs)
        note = f"{SIZE // uapi.PAGE_SIZE:,} pages read by a CPL3 guest; thread CPU time; best of {len(secs)} ({spread})"
        if target is not None:
            note = f"target ≤ {target:g} µs: {'met' if best <= target else 'missed'}; " + note
        report.add(Row(bench, kind, best, "µs/page", note=note))
    report.set_ratios(bench, "warm refill")


if __name__ == "__main__":
    rep = Report()
    run(rep)
    rep.save("faultpath", "python bench/faultpath.py")
    print(rep.markdown("python bench/faultpath.py"))
