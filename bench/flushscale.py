"""Bench 7: how the sim's vCPU-side flush costs scale (issue 15).

A zap reaches vCPUs as a remote TLB flush (``CpuSet.flush(gfn_start, gfn_end)``); each vCPU drops the cached
translations in the range at its next safe point. Tables, each growing one dimension:

* **ranged flush vs cached pages**: one vCPU with N cached 4 KiB translations (1k, 64k, 262k = 1 GiB)
  services one 4 KiB ranged flush of a page it cached (``VcpuRequests.service_locked``, what the vCPU runs before its
  next guest entry). Should not grow with N.
* **pending flushes of an idle vCPU**: a vCPU outside ``run()`` (64k cached pages) receives K ranged flushes
  of 4 KiB each (K zaps while it is not running), then services them once. Should stay bounded in K.
* **conversion vs memslots spanned**: one conversion of a range that spans 1, 100 or 1000 GUEST_MEMFD
  memslots (64 KiB each, one guest_memfd) while one vCPU reads a page of every slot in a loop, so it always
  holds translations in the range and must be flushed. KVM flushes once per conversion; so must the sim
  (a flush per memslot cost 18.5 ms for 300 slots). Grows with the slots (each is zapped and its "mixed"
  state recomputed), not with a kick per slot.
* **conversions vs vCPUs**: a SW_PROTECTED VM converts one 4 KiB page private↔shared in a loop
  (``set_memory_attributes``: a zap and a flush each) while 1, 2 or 4 vCPUs spin on their own counters on
  threads and never touch that page. No flush reaches them (they cached nothing there) and none of them
  enters Python, so what is left is the host scheduler: N busy threads and the converting one share the
  host's cores. The **bare busy thread** rows measure that share alone (hookless unicorn engines spinning,
  no VM vCPU at all). Interleaved on the loaded 2-core host, 4 bare threads left 0.34-0.46 of the
  1-thread rate and 4 spinning vCPUs 0.32-0.45. The flush no longer even checks them: it asks only the
  vCPUs the VM's index (``tlbcache.CachedRegions``) has in the range's 2 MiB regions.
* **implicit conversions vs vCPUs** (the target of issue 15: 4 vCPUs convert at least as many 4 KiB pages
  per second as 1): 1, 2 or 4 vCPUs each convert their own page back and forth by touching it through the
  private alias and the shared mapping, the VMM answering each memory-fault exit on that vCPU's thread;
  conversions/s summed over the vCPUs. The three run interleaved, ``IMPLICIT_ROUNDS`` rounds of one
  ``IMPLICIT_S`` run each, and each row is its best run: the load other jobs put on this 2-core host moves
  the rates by 2-3× within a minute, and a row measured alone in a quiet or a busy moment made the ratio
  say more about that moment than about the sim. Almost all of a conversion holds the GIL (unicorn and the
  guest's code, which run without it, are ~4% of a 1-vCPU run's CPU-clock samples: profile one long run with
  ``python bench/flushscale.py --implicit VCPUS SECONDS``), so N vCPU threads cannot convert faster than one,
  and every GIL hand-over between them costs a futex wake and a context switch. Each vCPU does the same
  Python per conversion as a lone one (the flush asks only the converting vCPU: 1.5 ``post_flush`` per
  conversion with 1 or 4 vCPUs; it was 6 with 4).
* **GIL ceiling** (diagnostic, ``gilceiling``): the bound those rows run into, with no sim at all: plain Python
  threads, a quarter of each iteration outside the GIL, 1/2/4 threads interleaved like the implicit rows.

These call the CPU layer's internals (cached translations through ``SimCpu.pages.resolve_page``,
``SimCpu.requests.service_locked``): they are diagnostics of exactly those paths.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

import gilceiling
from common import Report, Row, interleaved, judge

import kvmgmem
from kvmgmem import uapi
from kvmgmem.backends.sim.cpu import CpuSet, SimCpu
from kvmgmem.backends.sim.cpu.types import Mapped
from kvmgmem.guest import Asm, GuestImage, GuestVm, Label
from kvmgmem.guest import routines as R
from kvmgmem.hostmem import HostMemory

PAGE = 4096
CACHED = (1_000, 65_536, 262_144)
PENDING = (10, 1_000, 6_000)
VCPUS = (1, 2, 4)
CONVERSIONS_S = 1.0


class _FlatResolver:
    """gpa → the same offset of one host mapping, 4 KiB at a time."""

    def __init__(self, base: int) -> None:
        self.base = base

    def handle_fault(self, gpa: int, write: bool, fetch: bool) -> Mapped:
        return Mapped(self.base + gpa, PAGE, True)


def _cpu_with_cache(stack: ExitStack, pages: int) -> tuple[CpuSet, SimCpu]:
    mem = stack.enter_context(HostMemory(pages * PAGE))
    cpus = CpuSet(_FlatResolver(mem.address))
    stack.callback(cpus.close)
    cpus.add_store(mem.address, pages * PAGE)
    cpu = cpus.create_cpu(0)
    for gfn in range(pages):
        cpu.pages.resolve_page(gfn * PAGE, False, False)
    return cpus, cpu


def _service(cpu: SimCpu) -> float:
    t0 = time.perf_counter()
    with cpu.requests.cond:
        cpu.requests.service_locked()
    return time.perf_counter() - t0


def ranged_flush(pages: int, reps: int = 7) -> float:
    """Median seconds for one vCPU with ``pages`` cached pages to service one 4 KiB flush of a cached page."""
    with ExitStack() as stack:
        cpus, cpu = _cpu_with_cache(stack, pages)
        times = []
        for i in range(reps):
            gfn = (i * 7919) % pages
            cpus.flush(gfn, gfn + 1)
            times.append(_service(cpu))
            cpu.pages.resolve_page(gfn * PAGE, False, False)  # cache it again for the next round
        return statistics.median(times)


def pending_flushes(count: int, pages: int = 65_536) -> tuple[float, float]:
    """(seconds to post ``count`` 4 KiB flushes to an idle vCPU, seconds for it to service them)."""
    with ExitStack() as stack:
        cpus, cpu = _cpu_with_cache(stack, pages)
        t0 = time.perf_counter()
        for i in range(count):
            gfn = (i * 7919) % pages
            cpus.flush(gfn, gfn + 1)
        post = time.perf_counter() - t0
        return post, _service(cpu)


def conversions_per_s(vcpus: int) -> float:
    """4 KiB conversions/s with ``vcpus`` vCPUs spinning in the guest (none touches the converted page)."""
    gpa, size = 4 << 30, 2 << 20
    a = Asm()
    R.spin_counter(a)
    with ExitStack() as stack:
        kvm = stack.enter_context(kvmgmem.open("sim"))
        image = GuestImage(a, nvcpus=vcpus)
        g = stack.enter_context(GuestVm.create(kvm, image, vm_type=uapi.KVM_X86_SW_PROTECTED_VM))
        shared = stack.enter_context(HostMemory(size))
        gmem = stack.enter_context(g.vm.create_guest_memfd(size))
        stack.callback(g.close)  # deletes the memslot before its memory goes
        g.add_memory(1, gpa, shared, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)
        runners = [g.create_vcpu() for _ in range(vcpus)]
        stop = threading.Event()

        def spin(v: object) -> None:
            vcpu = v.vcpu  # type: ignore[attr-defined]
            while not stop.is_set():
                try:
                    vcpu.run()
                except kvmgmem.KvmError:
                    pass

        threads = [threading.Thread(target=spin, args=(r,), daemon=True) for r in runners]
        for t in threads:
            t.start()
        time.sleep(0.2)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < CONVERSIONS_S:
            g.vm.set_memory_attributes(gpa, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            g.vm.set_memory_attributes(gpa, PAGE, 0)
            n += 2
        rate = n / (time.perf_counter() - t0)
        stop.set()
        for r in runners:
            r.vcpu.kick()
        for t in threads:
            t.join(10)
        return rate


IMPLICIT_S = 0.75
IMPLICIT_ROUNDS = 3
IMPLICIT_BIT = 51  # the sim's private access bit for these rows (the demo's)


def implicit_conversions_per_s(vcpus: int, seconds: float = IMPLICIT_S) -> tuple[float, int]:
    """4 KiB implicit conversions/s summed over ``vcpus`` vCPUs, each converting its own page (its own 2 MiB
    region) by touching it through the private alias and then the shared one: every conversion is a
    memory-fault exit the VMM answers on that vCPU's thread with KVM_SET_MEMORY_ATTRIBUTES (a zap and a
    flush). Returns (rate, conversions)."""
    from kvmgmem.guest.image import PRIVATE_ALIAS_BASE
    from kvmgmem.vmm.convert import DiscardPolicy
    from kvmgmem.vmm.machine import Machine
    from kvmgmem.vmm.workload import STOP, Expectations, implicit_conversion_workload

    policy = DiscardPolicy.BOTH
    payload = implicit_conversion_workload(Expectations.for_policy(policy), PRIVATE_ALIAS_BASE)
    image = GuestImage(payload, nvcpus=vcpus, private_alias=IMPLICIT_BIT, private_alias_base=PRIVATE_ALIAS_BASE)
    base, region = 4 << 30, 2 << 20
    with Machine(image, backend="sim", vm_type=uapi.KVM_X86_SW_PROTECTED_VM, regions=[(base, vcpus * region)],
                 vcpus=vcpus, discard_policy=policy, args=lambda i: (base + i * region, PAGE),
                 private_access_bit=IMPLICIT_BIT) as m:  # fmt: skip

        def stop() -> None:
            for i in range(vcpus):
                m.write_u64(m.image.area(i).data + STOP, 1)

        timer = threading.Timer(seconds, stop)
        timer.start()
        try:
            wall = m.run(timeout=seconds + 60)
        finally:
            timer.cancel()
        stats = m.conversions.stats
        n = stats.to_private + stats.to_shared
        return n / wall, n


def _bare_spin(stop: threading.Event) -> None:
    """A host thread as busy as a spinning vCPU, with no sim in it: a hookless unicorn engine running
    ``inc rax; jmp`` in 50 ms slices (``emu_start`` releases the GIL, as a vCPU in guest code does)."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0x1000, PAGE)
    uc.mem_write(0x1000, b"\x48\xff\xc0\xeb\xfb")  # inc rax; jmp $-3
    while not stop.is_set():
        uc.emu_start(0x1000, 0, timeout=50_000)


def conversions_beside_spinners(spinners: int) -> float:
    """4 KiB conversions/s of a vCPU-less VM while ``spinners`` bare engines (``_bare_spin``) keep host cores
    busy: the host-scheduling share the spinning-vCPU rows would have without any sim work in the vCPUs."""
    gpa, size = 4 << 30, 2 << 20
    with ExitStack() as stack:
        kvm = stack.enter_context(kvmgmem.open("sim"))
        vm = stack.enter_context(kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM))
        gmem = stack.enter_context(vm.create_guest_memfd(size))
        vm.set_user_memory_region2(1, gpa, size, None, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
        stack.callback(vm.set_user_memory_region2, 1, gpa, 0, None, uapi.KVM_MEM_GUEST_MEMFD, gmem, 0)
        stop = threading.Event()
        threads = [threading.Thread(target=_bare_spin, args=(stop,), daemon=True) for _ in range(spinners)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.2)
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < CONVERSIONS_S:
                vm.set_memory_attributes(gpa, PAGE, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
                vm.set_memory_attributes(gpa, PAGE, 0)
                n += 2
            return n / (time.perf_counter() - t0)
        finally:
            stop.set()
            for t in threads:
                t.join(10)


SLOTS = (1, 100, 1000)
SLOT_SIZE = 64 << 10
SLOT_REPS = 10


def conversion_across_slots(nslots: int) -> float:
    """Median seconds for one private↔shared conversion of ``nslots`` memslots while a vCPU reads them all."""
    gpa, size = 4 << 30, nslots * SLOT_SIZE
    a = Asm()
    top = Label("again")
    a.label(top)
    R.touch_pages(a, gpa, size, value=None, stride=SLOT_SIZE)
    a.jmp(top)
    with ExitStack() as stack:
        kvm = stack.enter_context(kvmgmem.open("sim"))
        g = stack.enter_context(GuestVm.create(kvm, GuestImage(a), vm_type=uapi.KVM_X86_SW_PROTECTED_VM))
        gmem = stack.enter_context(g.vm.create_guest_memfd(size))
        stack.callback(g.close)  # deletes the memslots before the guest_memfd goes
        for i in range(nslots):
            g.vm.set_user_memory_region2(1 + i, gpa + i * SLOT_SIZE, SLOT_SIZE, None, uapi.KVM_MEM_GUEST_MEMFD,
                                         gmem, i * SLOT_SIZE)  # fmt: skip
        runner = g.create_vcpu()
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                try:
                    runner.vcpu.run()
                except kvmgmem.KvmError:
                    pass

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        time.sleep(0.2)
        times = []
        for i in range(SLOT_REPS):
            time.sleep(0.1)  # let the vCPU fault every slot back in (so the flush must reach it)
            t0 = time.perf_counter()
            g.vm.set_memory_attributes(gpa, size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if i % 2 == 0 else 0)
            times.append(time.perf_counter() - t0)
        stop.set()
        runner.vcpu.kick()
        thread.join(10)
        for i in range(nslots):
            g.vm.set_user_memory_region2(1 + i, gpa + i * SLOT_SIZE, 0, None, uapi.KVM_MEM_GUEST_MEMFD, gmem,
                                         i * SLOT_SIZE)  # fmt: skip
        return statistics.median(times)


def run(report: Report) -> None:
    bench = "7 vCPU flush scaling"
    base = None
    for pages in CACHED:
        seconds = ranged_flush(pages)
        note = "one vCPU services one 4 KiB ranged flush of a cached page; median of 7"
        row = report.add(Row(bench, f"ranged 4 KiB flush, {pages:,} cached pages", seconds * 1e6, "µs", note=note))
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
    base = None
    for count in PENDING:
        post, service = pending_flushes(count)
        row = report.add(Row(bench, f"{count:,} pending 4 KiB flushes, idle vCPU", service * 1e3, "ms",
                             note=f"64k cached pages; service time at its next entry; posting took "
                                  f"{post * 1e3:.1f} ms"))  # fmt: skip
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
    base = None
    for nslots in SLOTS:
        seconds = conversion_across_slots(nslots)
        row = report.add(Row(bench, f"conversion across {nslots:,} memslot(s), 1 vCPU reading them", seconds * 1e3,
                             "ms", note=f"{SLOT_SIZE >> 10} KiB GUEST_MEMFD slots; median of {SLOT_REPS}"))  # fmt: skip
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
    base = None
    for vcpus in VCPUS:
        rate = conversions_per_s(vcpus)
        row = report.add(Row(bench, f"4 KiB conversions, {vcpus} spinning vCPU(s)", rate, "conversions/s",
                             note=f"SW_PROTECTED VM; no vCPU touches the page; {CONVERSIONS_S:g} s"))  # fmt: skip
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
    base = None
    for spinners in VCPUS:
        rate = conversions_beside_spinners(spinners)
        row = report.add(Row(bench, f"4 KiB conversions beside {spinners} bare busy thread(s)", rate,
                             "conversions/s", note="diagnostic: no vCPU at all, hookless unicorn engines "
                             f"spinning on host threads; {CONVERSIONS_S:g} s"))  # fmt: skip
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
    base = None
    runs: dict[str, list[float]] = {str(v): [] for v in VCPUS}

    def sampler(vcpus: int) -> Callable[[], float]:
        def sample() -> float:
            rate = implicit_conversions_per_s(vcpus)[0]
            runs[str(vcpus)].append(rate)
            return rate

        return sample

    best = interleaved({str(v): sampler(v) for v in VCPUS}, IMPLICIT_ROUNDS)
    for vcpus in VCPUS:
        rate = best[str(vcpus)]
        seen = ", ".join(f"{r:,.0f}" for r in runs[str(vcpus)])
        row = report.add(Row(bench, f"4 KiB implicit conversions by {vcpus} vCPU(s)", rate, "conversions/s",
                             note=f"each vCPU converts its own page (memory-fault exits, private access bit); "
                                  f"sum over vCPUs; best of {IMPLICIT_ROUNDS} interleaved {IMPLICIT_S:g} s runs "
                                  f"({seen})"))  # fmt: skip
        base = base or row.value
        row.ratio = row.value / base if base and row.value is not None else None
        if vcpus == VCPUS[-1] and base:
            judge(row, "4 vCPUs ≥ 1 vCPU's 4 KiB conversions/s", row.value >= base, f"{row.ratio:.2f}×")
    gil_ceiling(report, bench)


def gil_ceiling(report: Report, bench: str) -> None:
    """The bound the implicit rows run into (``gilceiling``): plain threads, no sim, interleaved like them."""
    iteration, outside = gilceiling.split()
    best = interleaved({str(v): lambda v=v: gilceiling.rate(v, IMPLICIT_S) for v in VCPUS}, IMPLICIT_ROUNDS)
    note = (
        f"diagnostic: no sim; Python threads, each iteration {iteration * 1e6:.0f} µs with {outside:.0%} of it "
        f"outside the GIL (unicorn emu_start); best of {IMPLICIT_ROUNDS} interleaved {IMPLICIT_S:g} s runs"
    )
    for threads in VCPUS:
        report.add(Row(bench, f"GIL ceiling: {threads} plain thread(s)", best[str(threads)], "iterations/s",
                       ratio=best[str(threads)] / best[str(VCPUS[0])], note=note))  # fmt: skip


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--implicit"]:  # one long run to profile, e.g. with perf record -p (docs/bench.md)
        try:
            vcpus, seconds = int(sys.argv[2]), float(sys.argv[3])
        except (IndexError, ValueError):
            sys.exit("usage: python bench/flushscale.py --implicit VCPUS SECONDS")
        rate, n = implicit_conversions_per_s(vcpus, seconds)
        print(f"{vcpus} vCPU(s): {n:,} implicit conversions, {rate:,.0f}/s")
        sys.exit(0)
    rep = Report()
    run(rep)
    rep.save("flushscale", "python bench/flushscale.py")
    print(rep.markdown("python bench/flushscale.py"))
