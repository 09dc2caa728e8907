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
