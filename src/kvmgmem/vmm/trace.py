"""Structured trace events (fault, zap, convert, exit, punch) and their sinks.

A VMM that converts memory is hard to debug from counters alone (dstack had to reach for bpftrace to find a
boot problem: dstack issue #1220, bpftrace on ``kvm_vm_set_mem_attributes``). Every conversion step is an event with a
timestamp, the vCPU or thread that caused it and the gpa range; sinks turn them into JSON lines or a Chrome/Perfetto
trace a person can open.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import IO, Any


@dataclass(frozen=True)
class TraceEvent:
    kind: str  # "convert", "punch", "discard", "exit", "fault", "zap", "sync"
    ts: float  # seconds since the tracer started
    duration: float = 0.0
    vcpu: int | None = None
    args: dict[str, Any] = field(default_factory=dict)


class Tracer:
    """Collects events in memory (bounded) and counts them by kind; thread-safe."""

    def __init__(self, limit: int = 200_000) -> None:
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._limit = limit
        self.events: list[TraceEvent] = []
        self.counts: dict[str, int] = {}
        self.dropped = 0

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def emit(self, kind: str, *, start: float | None = None, vcpu: int | None = None, **args: Any) -> None:
        now = self.now()
        ts = now if start is None else start
        event = TraceEvent(kind=kind, ts=ts, duration=now - ts, vcpu=vcpu, args=args)
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if len(self.events) < self._limit:
                self.events.append(event)
            else:
                self.dropped += 1

    def write_jsonl(self, out: IO[str]) -> None:
        with self._lock:
            events = list(self.events)
        for event in events:
            out.write(json.dumps(asdict(event)) + "\n")

    def chrome_trace(self) -> dict[str, Any]:
        """The Chrome trace-event format (open in Perfetto or chrome://tracing): one track per vCPU."""
        with self._lock:
            events = list(self.events)
        trace = []
        for event in events:
            tid = -1 if event.vcpu is None else event.vcpu
            record: dict[str, Any] = {
                "name": event.kind,
                "cat": event.kind,
                "pid": 1,
                "tid": tid,
                "ts": event.ts * 1e6,
                "args": event.args,
            }
            if event.duration > 0:
                record.update(ph="X", dur=event.duration * 1e6)
            else:
                record.update(ph="i", s="t")
            trace.append(record)
        names = {e.vcpu for e in events}
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": -1 if v is None else v,
             "args": {"name": "vmm" if v is None else f"vCPU {v}"}}
            for v in names
        ]  # fmt: skip
        return {"traceEvents": meta + trace, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump(self.chrome_trace(), out)
