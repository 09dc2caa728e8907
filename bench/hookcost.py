"""Bench 10: what a false IN/OUT candidate in a hot loop costs on the sim (issue 15).

The sim cannot decode guest code before it runs, so it treats every byte that could be an IN/OUT opcode as a
possible one (``backends/sim/cpu/sites.py``). Compiled code is full of such bytes inside other instructions:
``cmp r13, rbp`` is ``49 39 ed`` and ``ed`` is ``in eax, dx``. Before issue 15's fix the byte after each
candidate carried a code hook, so the ``dec`` after that ``cmp`` ran unicorn's hook dispatch, which walks
every code hook of the engine, on every iteration.

The payload first runs (once, untimed) a sled of ``SLED_PAGES`` pages of ``mov eax, 0xedecedec`` (four false
candidates per instruction, i.e. thousands of candidate sites, as a large compiled guest has), then times
``cmp r13, rbp; dec rcx; jnz`` (``false candidate``) against the same loop with ``cmp r13, rbx``
(``49 39 dd``, no candidate). Rates are by the vCPU thread's CPU time, best of ``REPS``; the ratio column is
against the loop without a candidate. Target: ≥ 90%.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from common import Report, Row, interleaved, judge, timed_loop

import kvmgmem
from kvmgmem.guest import Asm, GuestImage, GuestVm
from kvmgmem.guest.operands import al, eax, r13, rbp, rbx, rcx

REPS = 5
TARGET = 0.90
ITERATIONS = 20_000_000
SLED_PAGES = 4
SLED_IMM = 0xEDECEDEC


def payload(n: int, other: object) -> Asm:
    """``<sled>; start: out 0x10; mov rcx, n; 1: cmp r13, other; dec rcx; jnz 1b; out 0x11; jmp start``."""
    a = Asm()
    start, top = a.new_label("start"), a.new_label("top")
    for _ in range(SLED_PAGES * 4096 // 5):
        a.mov(eax, SLED_IMM)
    a.label(start).out(0x10, al).mov(rcx, n)
    a.label(top).cmp(r13, other).dec(rcx).jnz(top)  # type: ignore[arg-type]
    return a.out(0x11, al).jmp(start)


def sampler(stack: ExitStack, other: object, n: int) -> Callable[[], float]:
    """One timed loop per call on a VM of its own: guest instructions per second of the vCPU thread's CPU
    time (3 per iteration)."""
    system = stack.enter_context(kvmgmem.open("sim"))
    g = stack.enter_context(GuestVm.create(system, GuestImage(payload(n, other))))
    vcpu = g.create_vcpu().vcpu

    def sample() -> float:
        return 3 * n / timed_loop(vcpu)

    return sample


def run(report: Report, n: int = ITERATIONS) -> None:
    bench = "10 false IN/OUT candidates"
    note = f"{3 * n:,} instructions after a {SLED_PAGES}-page sled of candidates, best of {REPS} interleaved, CPU time"
    with ExitStack() as stack:
        samplers = {"clean": sampler(stack, rbx, n), "hot": sampler(stack, rbp, n)}
        best = interleaved(samplers, REPS)
    report.add(Row(bench, "sim, loop without candidate", best["clean"], "instr/s", ratio=1.0, note=note))
    hot = report.add(Row(bench, "sim, `cmp r13, rbp` (49 39 ed) in loop", best["hot"], "instr/s", note=note))
    hot.ratio = best["hot"] / best["clean"]
    judge(hot, "false candidate ≥ 90% of the loop without", hot.ratio >= TARGET, f"{100 * hot.ratio:.0f}%")
