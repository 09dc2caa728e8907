"""Run every benchmark in one go: ``python bench/run.py [exits populate convert faults execspeed workload
flushscale faultpath upstream hookcost ucalls]``.

Writes ``bench/results/all.json`` and ``bench/results/all.md`` and prints the markdown table and the command
that reproduces it. A benchmark that fails becomes a row saying so (with the error), not a missing row.
Takes about 2 minutes on the project's 2-core host (80-130 s quiet, more when other jobs load it).
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from common import Report, Row

BENCHES = ["exits", "populate", "convert", "faults", "faultpath", "execspeed", "workload", "flushscale", "upstream"]
COMMAND = "python bench/run.py"
BENCHES += ["hookcost"]  # bench 10: false IN/OUT candidates on the sim (issue 15)
BENCHES += ["ucalls"]  # bench 11: the guest layer's run loop around a ucall


LOOP = 5_000_000


def host_speed(report: Report, when: str) -> None:
    """Bench 0: how fast this host runs plain Python right now, so that a run's absolute numbers can be
    compared with another's. These 2-core VMs share their hardware: the same loop took 38 to 133 ns per
    iteration on one machine within an hour (2026-12-02). A rough indicator only: the sim's rows can be slow
    while this loop is fast."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(LOOP):
            x += i
        best = min(best, time.perf_counter() - t0)
    report.add(Row("0 host speed", f"pure-Python loop, {when} the benchmarks", best / LOOP * 1e9, "ns/iteration",
                   note=f"`x += i` over range({LOOP:,}), best of 3; lower is faster"))  # fmt: skip


def main(argv: list[str]) -> int:
    chosen = argv or BENCHES
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    command = " ".join([COMMAND, *argv])
    report = Report()
    t_all = time.perf_counter()
    failed = 0
    host_speed(report, "before")
    for name in chosen:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(name).run(report)
        except Exception as e:  # a broken bench is a result too
            failed += 1
            traceback.print_exc()
            report.add(Row(name, "ERROR", None, "", note=f"{type(e).__name__}: {e}"[:300]))
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    host_speed(report, "after")
    total = time.perf_counter() - t_all
    jpath, mpath = report.save("all", command)
    with mpath.open("a") as f:
        f.write(f"\nTotal runtime {total:.0f} s.\n")
    print()
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}; reproduce with: {command}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
