"""Counterexamples for people: a step-by-step table, and a Chrome/Perfetto trace like ``demo --trace``.

Why both: the table is what goes into a bug report or docs; the trace shows the threads as parallel tracks,
one slice per kernel step, so the interleaving is visible at a glance (open it in ui.perfetto.dev).
"""

from __future__ import annotations

import json
from typing import IO, Any

from .scheduler import Run


def schedule_text(run: Run) -> str:
    """The schedule as ``--replay`` accepts it."""
    return ",".join(str(i) for i in run.schedule)


def table(run: Run, width: int = 110) -> str:
    """One row per executed step: step number, thread, kernel step, locks taken (+) / dropped (-), and the
    state that changed."""
    rows = [("#", "thread", "step", "lock", "state change")]
    for e in run.events:
        rows.append((str(e.index), e.thread, e.label, e.locks, e.change))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = min(max(len(r[2]) for r in rows), 84)
    w3 = min(max(len(r[3]) for r in rows), 40)
    out = []
    for r in rows:
        label = r[2] if len(r[2]) <= w2 else r[2][: w2 - 1] + "…"
        lock = r[3] if len(r[3]) <= w3 else r[3][: w3 - 1] + "…"
        out.append(f"{r[0]:>{w0}}  {r[1]:<{w1}}  {label:<{w2}}  {lock:<{w3}}  {r[4]}".rstrip())
    out.append("")
    if run.diverged is not None:
        out.append(f"(the given schedule no longer applied at step {run.diverged}; continued from there)")
    for v in run.violations:
        out.append(f"VIOLATION {v}")
    return "\n".join(out)


def chrome_trace(run: Run, scenario: str) -> dict[str, Any]:
    """The Chrome trace-event format (same shape as ``kvmgmem demo --trace``): one track per thread, one
    1 ms slice per step (the model has no clock; the order is what matters), violations as instants."""
    threads = sorted({e.thread for e in run.events}, key=[e.thread for e in run.events].index)
    tid = {name: i + 1 for i, name in enumerate(threads)}
    events: list[dict[str, Any]] = []
    for e in run.events:
        events.append(
            {
                "name": e.label,
                "cat": "step",
                "ph": "X",
                "pid": 1,
                "tid": tid[e.thread],
                "ts": (e.index - 1) * 1000.0,
                "dur": 1000.0,
                "args": {"step": e.index, "lock": e.locks, "change": e.change},
            }
        )
    last = run.events[-1].index if run.events else 0
    for v in run.violations:
        events.append(
            {
                "name": v.invariant,
                "cat": "violation",
                "ph": "i",
                "s": "g",
                "pid": 1,
                "tid": 0,
                "ts": last * 1000.0,
                "args": {"detail": v.detail},
            }
        )
    meta = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": f"kvmgmem check {scenario}"}}]
    meta += [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": n}} for n, t in tid.items()]
    return {"traceEvents": meta + events, "displayTimeUnit": "ms"}


def write_trace(run: Run, scenario: str, out: IO[str]) -> None:
    json.dump(chrome_trace(run, scenario), out)
