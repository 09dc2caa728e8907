"""Shared pieces of the benchmarks: result records, the markdown table, guest builders, the C baseline.

Every benchmark measures its variants side by side in one run and reports ratios against a baseline of the
same run, because this host is itself a VM and absolute times drift between runs (by up to 2×, docs/bench.md).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import kvmgmem
from kvmgmem.exits import IoExit
from kvmgmem.guest import Asm, GuestImage

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass
class Row:
    bench: str
    variant: str
    value: float | None
    unit: str
    ratio: float | None = None  # value / baseline value of the same bench, when there is a baseline
    note: str = ""
    target: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.bench:28} {row.variant:42} {_fmt(row.value)} {row.unit} {row.note}", flush=True)
        return row

    def set_ratios(self, bench: str, baseline_variant: str) -> None:
        base = next((r for r in self.rows if r.bench == bench and r.variant == baseline_variant), None)
        if base is None or not base.value:
            return
        for r in self.rows:
            if r.bench == bench and r.value is not None:
                r.ratio = r.value / base.value

    def markdown(self, command: str) -> str:
        lines = [
            f"Measured {time.strftime('%Y-%m-%d', time.gmtime(self.started))} on {platform.node() or 'this host'} "
            f"({platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}); "
            f"reproduce with `{command}`.",
            "",
            "| bench | variant | value | unit | ratio | target / note |",
            "|---|---|---:|---|---:|---|",
        ]
        for r in self.rows:
            ratio = f"{r.ratio:.3g}" if r.ratio is not None else ""
            extra = "; ".join(x for x in (r.target, r.note) if x)
            cells = (r.bench, r.variant, _fmt(r.value), r.unit, ratio, extra)
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def save(self, name: str, command: str) -> tuple[Path, Path]:
        RESULTS.mkdir(exist_ok=True)
        jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
        meta = {
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "host": f"{platform.node()} {platform.machine()} Linux {platform.release()}",
            "python": platform.python_version(),
            "seconds": round(time.time() - self.started, 1),
        }
        jpath.write_text(json.dumps({**meta, "rows": [asdict(r) for r in self.rows]}, indent=2))
        mpath.write_text(self.markdown(command))
        return jpath, mpath


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def judge(row: Row, want: str, met: bool | None, measured: str) -> Row:
    """Write the target verdict next to the measured value: ``want: met|missed (measured)``."""
    verdict = "n/a" if met is None else ("met" if met else "missed")
    row.target = f"target {want}: {verdict} ({measured})"
    return row


def interleaved(samplers: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Best rate per variant over ``rounds`` rounds that run every variant once, in turn.

    Interleaving spreads the noise of other jobs on this 2-core host over all variants alike, so the ratios
    of one run stay meaningful even when the absolute rates move."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in samplers.items():
            best[name] = max(best.get(name, 0.0), fn())
    return best


def open_or_none(backend: str) -> kvmgmem.System | None:
    try:
        return kvmgmem.open(backend)
    except (OSError, ImportError) as e:
        print(f"  (backend {backend} unavailable: {e})")
        return None


def timed_loop(vcpu: kvmgmem.Vcpu) -> float:
    """Thread CPU seconds the guest spends between its ``out 0x10`` and ``out 0x11`` exits: the bench payloads
    bracket their timed loop with those two ports, and the vCPU runs on this thread."""
    first = vcpu.run()
    assert isinstance(first, IoExit) and first.port == 0x10, first
    c0 = time.thread_time()
    second = vcpu.run()
    seconds = time.thread_time() - c0
    assert isinstance(second, IoExit) and second.port == 0x11, second
    return seconds


def best_of(n: int, fn: Callable[[], float]) -> float:
    """The best (highest) of ``n`` rate measurements: noise on this host only ever slows things down."""
    return max(fn() for _ in range(n))


def c_baseline(source: str) -> Path | None:
    """Compile ``bench/c/<source>`` with gcc -O2 into a temp dir (None if there is no compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="kvmgmem-bench-")) / source.removesuffix(".c")
    subprocess.run([cc, "-O2", "-o", str(out), str(HERE / "c" / source)], check=True)
    return out


def image_file(image: GuestImage, mem_size: int) -> tuple[Path, Path, Any]:
    """Write the image's memory and a (regs, sregs) state for vCPU 0 to files for the C baseline."""
    import ctypes

    with kvmgmem.open("kvm") as kvm, kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        image.setup_vcpu(vcpu, 0, cpuid=False)
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    buf = bytearray(mem_size)
    image.load(buf, 0)
    tmp = Path(tempfile.mkdtemp(prefix="kvmgmem-bench-"))
    (tmp / "image.bin").write_bytes(bytes(buf))
    state = ctypes.string_at(ctypes.addressof(regs), ctypes.sizeof(regs))
    state += ctypes.string_at(ctypes.addressof(sregs), ctypes.sizeof(sregs))
    (tmp / "state.bin").write_bytes(state)
    return tmp / "image.bin", tmp / "state.bin", tmp


def out_loop() -> Asm:
    """``out 0x10, al; inc eax; jmp`` forever: one IO exit per iteration."""
    from kvmgmem.guest.operands import al, eax

    a = Asm()
    top = a.new_label("top")
    return a.label(top).out(0x10, al).inc(eax).jmp(top)
