"""Bench 2: guest_memfd population — a CPL3 guest writes one byte to every 4 KiB page of a fresh slot.

Backings, side by side in one run (interleaved rounds, a fresh VM and fresh memory each time, best of N):

* guest_memfd created with MMAP|INIT_SHARED, memslot via KVM_SET_USER_MEMORY_REGION2 with userspace_addr =
  the gmem's own mapping (on this host native CPL3 accesses then use the gmem pages; docs/conformance.md);
* anonymous ``MAP_SHARED`` memory (``HostMemory``) — the baseline.

On kvm the slot is 1 GiB (262,144 pages). The sim resolves every 4 KiB page through its TLB-fill hook and
fault path in Python, so it touches a smaller slot (``SIM_SIZE``); rows report pages/s so they compare.
The timed window is between two SYNC ucalls around the touch loop (guest-side, no host work inside).
"""

from __future__ import annotations

import time

from common import Report, Row, judge, open_or_none

from kvmgmem import uapi
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.hostmem import HostMemory

GPA = 1 << 30
KVM_SIZE = 1 << 30
SIM_SIZE = 128 << 20
ROUNDS_KVM = 2
ROUNDS_SIM = 2


def touch_payload(gpa: int, size: int) -> Asm:
    a = Asm()
    U.sync(a)
    R.touch_pages(a, gpa, size, value=1)
    U.sync(a)
    U.done(a)
    return a


def touch_once(backend: str, backing: str, size: int) -> float:
    """Seconds for the guest to touch every page of a fresh ``size``-byte slot backed by ``backing``."""
    system = open_or_none(backend)
    assert system is not None
    with system:
        vm = system.create_vm()
        gmem = None
        buffer: object
        if backing == "gmem":
            gmem = vm.create_guest_memfd(size, uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED)
            buffer = gmem.mmap()
        else:
            buffer = HostMemory(size)
        try:
            with GuestVm(vm, GuestImage(touch_payload(GPA, size), user=True)) as g:
                if gmem is not None:
                    g.add_memory(1, GPA, buffer, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
                else:
                    g.add_memory(1, GPA, buffer)
                gv = g.create_vcpu()
                gv.expect_sync()
                t0 = time.perf_counter()
                gv.expect_sync(timeout=300)
                seconds = time.perf_counter() - t0
                gv.run_to_done()
        finally:
            buffer.close()  # type: ignore[attr-defined]
            if gmem is not None:
                gmem.close()
    return seconds


SIM_TARGET = 0.25  # issue 15: sim populate of guest_memfd memory ≥ 25% of kvm's pages/s on the same guest


def run(report: Report) -> None:
    gmem_rates: dict[str, float] = {}
    for backend, size, rounds in (("kvm", KVM_SIZE, ROUNDS_KVM), ("sim", SIM_SIZE, ROUNDS_SIM)):
        bench = f"2 populate ({backend})"
        system = open_or_none(backend)
        if system is None:
            report.add(Row(bench, "all", None, "pages/s", note=f"backend {backend} unavailable"))
            continue
        system.close()
        pages = size // uapi.PAGE_SIZE
        times: dict[str, list[float]] = {"anon": [], "gmem": []}
        for _ in range(rounds):
            for backing in times:
                times[backing].append(touch_once(backend, backing, size))
        label = {"anon": "anonymous memory (MAP_SHARED)", "gmem": "guest_memfd MMAP|INIT_SHARED, hva = its mmap"}
        for backing in ("anon", "gmem"):
            best = min(times[backing])
            spread = ", ".join(f"{t:.2f}" for t in times[backing])
            note = f"{size >> 20} MiB = {pages:,} pages, CPL3 guest; best of {rounds} (s: {spread})"
            if backend == "sim":
                note += f"; sim uses {size >> 20} MiB, not 1 GiB (Python fault path per page)"
            row = report.add(Row(bench, label[backing], pages / best, "pages/s", note=note))
            if backing == "gmem":
                gmem_rates[backend] = pages / best
                if backend == "sim" and "kvm" in gmem_rates:
                    share = gmem_rates["sim"] / gmem_rates["kvm"]
                    judge(row, f"sim ≥ {SIM_TARGET:.0%} of kvm's guest_memfd pages/s", share >= SIM_TARGET,
                          f"{share:.1%}")  # fmt: skip
        report.set_ratios(bench, label["anon"])


if __name__ == "__main__":
    rep = Report()
    run(rep)
    rep.save("populate", "python bench/populate.py")
    print(rep.markdown("python bench/populate.py"))
