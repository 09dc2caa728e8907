"""Bench 11: what the guest layer's run loop adds to a ucall round trip.

A guest loops on SYNC ucalls (``routines.sync_loop``: ``ucall.sync(rax); inc rax; jmp``). Three loops over
the same vCPU, interleaved, best of ``ROUNDS``, per backend:

* ``vcpu.run()``: the raw exit, no decoding (the baseline);
* ``GuestVcpu.run(timeout=None)``: the ucall decoded into a ``Sync`` event;
* ``GuestVcpu.run(timeout=10)``: the same with a watchdog armed for every ucall, the default of
  ``run``/``expect_sync``.

The watchdog started and cancelled a ``threading.Timer`` (a host thread) per call until 2026-12-02: about
125 µs each, so a timed run loop made 3,708 ucalls/s on the sim and 4,748 on kvm (this bench against that
tree, docs/bench.md). Now every watchdog shares one deadline thread (``kvmgmem.guest.deadlines``), and arming
one is a dict insert.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack

from common import Report, Row, interleaved, open_or_none

from kvmgmem.guest import Asm, GuestImage, GuestVcpu, GuestVm
from kvmgmem.guest import routines as R

CALLS = 2_000
ROUNDS = 5


def payload() -> Asm:
    return R.sync_loop(Asm())


def samplers(v: GuestVcpu) -> dict[str, Callable[[], float]]:
    def rate(call: Callable[[], object]) -> Callable[[], float]:
        def sample() -> float:
            t0 = time.perf_counter()
            for _ in range(CALLS):
                call()
            return CALLS / (time.perf_counter() - t0)

        return sample

    return {
        "vcpu.run() (raw exit)": rate(v.vcpu.run),
        "GuestVcpu.run(timeout=None)": rate(lambda: v.run(timeout=None)),
        "GuestVcpu.run(timeout=10)": rate(lambda: v.run(timeout=10)),
    }


def run(report: Report) -> None:
    bench = "11 ucall round trip"
    note = f"SYNC ucall loop at CPL0; {CALLS:,} calls, best of {ROUNDS} interleaved"
    for backend in ("sim", "kvm"):
        with ExitStack() as stack:
            system = open_or_none(backend)
            if system is None:
                report.add(Row(bench, f"{backend}, all variants", None, "ucalls/s", note="n/a: no such backend here"))
                continue
            stack.enter_context(system)
            g = stack.enter_context(GuestVm.create(system, GuestImage(payload())))
            v = g.create_vcpu()
            v.run(timeout=10)  # the first entry sets the vCPU up; not timed
            best = interleaved(samplers(v), ROUNDS)
        base = next(iter(best.values()))
        for variant, value in best.items():
            report.add(Row(bench, f"{backend}, {variant}", value, "ucalls/s", ratio=value / base, note=note))


if __name__ == "__main__":
    rep = Report()
    run(rep)
    rep.save("ucalls", "python bench/ucalls.py")
    print(rep.markdown("python bench/ucalls.py"))
