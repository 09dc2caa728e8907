"""Bench 7's GIL ceiling: what N Python threads can do on this host when most of their work holds the GIL.

No sim and no VM: each of N threads loops on an iteration of pure Python (the GIL held) followed by
``emu_start`` calls on a hookless unicorn engine of its own (``dec rcx; jnz``: the GIL released, as a vCPU's
guest code releases it). Iterations/s summed over the threads, for 1, 2 and 4 threads. Bench 7's rows use
the default split: about a quarter of an iteration outside the GIL (measured on one thread and printed),
iterations of about 180-200 µs (a 4 KiB implicit conversion on the sim takes 250-300 µs). Other splits, for
the numbers docs/bench.md quotes: ``python bench/gilceiling.py PY_ITERS EMU_CALLS EMU_LOOPS``.

Why it is here: the implicit-conversion rows ask 4 vCPUs to convert at least as fast as 1. A conversion is
almost all interpreter work (a CPU-clock profile of a 1-vCPU run puts unicorn and its translated guest code at
about 4% of the samples, docs/bench.md), so N threads can overlap only that small share, while every hand-over
of the GIL between them costs a futex wake and a context switch. These rows measure that bound on the same
host in the same run, with six times the sim's GIL-free share and nothing else in the way: no locks, no
model, no flushes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PY_ITERS = 2_500  # pure-Python loop iterations per iteration (GIL held)
EMU_CALLS = 2  # emu_start calls per iteration (GIL released)
EMU_LOOPS = 2_000  # guest loop count per emu_start
CODE = bytes.fromhex("48ffc975fb")  # dec rcx; jnz $-3
BASE = 0x1000


@dataclass(frozen=True)
class Split:
    """One iteration: ``py_iters`` rounds of a Python loop, then ``emu_calls`` emu_starts of ``emu_loops``."""

    py_iters: int = PY_ITERS
    emu_calls: int = EMU_CALLS
    emu_loops: int = EMU_LOOPS

    def python_part(self) -> int:
        x = 0
        for i in range(self.py_iters):
            x += i * i % 7
        return x

    def guest_part(self, uc: Any) -> None:
        from unicorn.x86_const import UC_X86_REG_RCX

        for _ in range(self.emu_calls):
            uc.reg_write(UC_X86_REG_RCX, self.emu_loops)
            uc.emu_start(BASE, BASE + len(CODE))


def _engine() -> Any:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(BASE, 0x1000)
    uc.mem_write(BASE, CODE)
    return uc


def split(shape: Split = Split()) -> tuple[float, float]:
    """(seconds of one iteration, share of it outside the GIL), best of 50 on this thread."""

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    uc = _engine()
    python, guest = best(shape.python_part), best(lambda: shape.guest_part(uc))
    return python + guest, guest / (python + guest)


def rate(threads: int, seconds: float, shape: Split = Split()) -> float:
    """Iterations/s summed over ``threads`` threads running for ``seconds``."""
    stop = threading.Event()
    counts = [0] * threads

    def body(i: int) -> None:
        uc = _engine()
        n = 0
        while not stop.is_set():
            shape.python_part()
            shape.guest_part(uc)
            n += 1
        counts[i] = n

    workers = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join(10)
    return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    """``python bench/gilceiling.py [PY_ITERS EMU_CALLS EMU_LOOPS]``: the split, then 1/2/4 threads, best of 3
    interleaved 0.75 s runs."""
    try:
        shape = Split(*(int(a) for a in argv[:3]))
    except (TypeError, ValueError):
        print("usage: python bench/gilceiling.py [PY_ITERS EMU_CALLS EMU_LOOPS]", file=sys.stderr)
        return 2
    iteration, outside = split(shape)
    print(f"{shape}: iteration {iteration * 1e6:.0f} µs, {outside:.0%} outside the GIL")
    best: dict[int, float] = {}
    for _ in range(3):
        for threads in (1, 2, 4):
            best[threads] = max(best.get(threads, 0.0), rate(threads, 0.75, shape))
    for threads, value in best.items():
        print(f"{threads} thread(s): {value:,.0f} iterations/s, {value / best[1]:.2f}x of 1")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
