"""Bench 1: exit round trips — a guest looping on OUT, exits/s through kvmgmem vs a plain C KVM_RUN loop.

Variants, all measured in interleaved rounds (best of each, see ``common.interleaved``):

* the C program ``bench/c/exitloop.c`` running the same image (CPL3 native, CPL0 emulated) — the baseline;
* kvmgmem on kvm, ``vcpu.run()`` returning typed exits, payload at CPL3 and at CPL0, twice: through the C
  extension ``kvmgmem.backends.kvm._run`` (what a normal install uses) and through the pure-Python fallback
  (``KVMGMEM_NO_CEXT=1``: ctypes without argtypes, struct decode, cached IoExits);
* a bare Python loop calling the backend's ctypes KVM_RUN function on the same vCPU fd (no exit decoding) — a
  diagnostic that splits Python's own cost from the library's;
* the C program's loop run inside this process on a kvmgmem vCPU (``exitloop.c`` built as a library) — a
  diagnostic: the same kernel round trip as ``vcpu.run()`` with no Python in it, so it shows whether the C
  program's VM and kvmgmem's differ in the kernel, and ``--paired`` subtracts it from ``vcpu.run()``;
* the sim, payload at CPL0 and at CPL3 (ratio against the C loop on kvm at the same CPL).

Target: kvmgmem's loop (typed exits, C extension) ≥ 95% of the C loop's exits/s, at each CPL. The pure-Python
fallback is reported against the same baseline but has no target (its floor is ctypes' per-call cost).

Noise: a row's best wall-clock sample should run at about its best thread-CPU-time rate; when it runs well
below (``NOISY``: every sample waited for a CPU while other jobs ran), up to ``2 * rounds`` more rounds are
taken, and if the C loop or the judged row is still that far off, the verdict is "n/a (host loaded)" instead
of met/missed: a ratio of two disturbed samples says nothing about the per-exit cost.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import HERE, Report, Row, c_baseline, image_file, interleaved, judge, open_or_none, out_loop

from kvmgmem import uapi
from kvmgmem.exits import IoExit
from kvmgmem.guest import GuestImage, GuestVm

N_KVM = 5_000
N_SIM = 20_000
ROUNDS = 15
TARGET = 0.95
CEXT = "C extension"
PURE = "pure-Python fallback"
INPROC = "C loop in-process on a kvmgmem vCPU"
#: A row's best wall-clock rate below this share of its best CPU-time rate: no sample ran undisturbed.
NOISY = 0.9


Sampler = Callable[[], tuple[float, float]]  # one sample: (exits per wall second, exits per thread CPU second)


def _python_sampler(
    stack: ExitStack, backend: str, user: bool, n: int, raw: bool = False, pure: bool = False
) -> Sampler | None:
    system = open_or_none(backend)
    if system is None:
        return None
    stack.enter_context(system)
    g = stack.enter_context(GuestVm.create(system, GuestImage(_loop(), user=user)))
    old = os.environ.get("KVMGMEM_NO_CEXT")
    os.environ["KVMGMEM_NO_CEXT"] = "1" if pure else "0"  # read when the vCPU is created
    try:
        vcpu = g.create_vcpu().vcpu
    finally:
        if old is None:
            del os.environ["KVMGMEM_NO_CEXT"]
        else:
            os.environ["KVMGMEM_NO_CEXT"] = old
    if backend == "kvm" and not raw and getattr(vcpu, "uses_cext", None) is pure:
        print(f"  (kvm vCPU: uses_cext={not pure} was asked for but not available; is the extension built?)")
        return None
    first = vcpu.run()
    assert isinstance(first, IoExit) and first.port == 0x10, first
    if raw:
        from kvmgmem.backends.kvm.sys_calls import kvm_run_function

        kvm_run, fd, request = kvm_run_function(), vcpu.fd, uapi.KVM_RUN

        def once_raw() -> tuple[float, float]:
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(n):
                if kvm_run(fd, request, 0) < 0:
                    raise OSError("KVM_RUN failed")
            t1, c1 = time.perf_counter(), time.thread_time()
            return n / (t1 - t0), n / (c1 - c0)

        return once_raw

    def once() -> tuple[float, float]:
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            exit = vcpu.run()
            if not isinstance(exit, IoExit):
                raise RuntimeError(f"unexpected exit {exit}")
        t1, c1 = time.perf_counter(), time.thread_time()
        return n / (t1 - t0), n / (c1 - c0)

    return once


def _c_sampler(binary: Any, user: bool, n: int) -> Sampler:
    image = GuestImage(_loop(), user=user)
    mem = (image.end + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    img, state, _ = image_file(image, mem)

    def once() -> tuple[float, float]:
        out = subprocess.run([str(binary), str(img), str(mem), str(state), str(n)], check=True,
                             capture_output=True, text=True)  # fmt: skip
        result = json.loads(out.stdout)
        return float(result["exits_per_second"]), n / float(result["cpu_seconds"])

    return once


def _exitloop_library() -> Any | None:
    """``bench/c/exitloop.c`` built with ``-shared -DEXITLOOP_LIBRARY`` and loaded (None without a compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    out = Path(tempfile.mkdtemp(prefix="kvmgmem-bench-")) / "libexitloop.so"
    src = HERE / "c" / "exitloop.c"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-DEXITLOOP_LIBRARY", "-o", str(out), str(src)], check=True)
    lib = ctypes.CDLL(str(out), use_errno=True)
    lib.exitloop_timed.restype = ctypes.c_long
    lib.exitloop_timed.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                   ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_double)]  # fmt: skip
    return lib


def _kvm_run_address(stack: ExitStack, vcpu: Any) -> int:
    """The address of a mapping of ``vcpu``'s kvm_run of our own (unmapped by ``stack`` before the VM goes)."""
    mapping = mmap.mmap(vcpu.fd, len(vcpu._map), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = ctypes.c_char.from_buffer(mapping)
    holder = [view]

    def unmap() -> None:
        holder.clear()  # the buffer export goes first, or close() raises BufferError
        mapping.close()

    stack.callback(unmap)
    return ctypes.addressof(view)


def _timed_c_loop(lib: Any, fd: int, address: int, n: int) -> tuple[float, float]:
    """``exitloop_timed`` on vCPU ``fd``: (seconds, thread CPU seconds) for ``n`` IO exits."""
    seconds, cpu = ctypes.c_double(), ctypes.c_double()
    done = lib.exitloop_timed(fd, address, n, ctypes.byref(seconds), ctypes.byref(cpu))
    if done < 0:
        raise OSError(ctypes.get_errno(), "KVM_RUN failed")
    if done != n:
        raise RuntimeError(f"unexpected exit after {done} exits")
    return seconds.value, cpu.value


def _inproc_sampler(stack: ExitStack, lib: Any, user: bool, n: int) -> Sampler | None:
    system = open_or_none("kvm")
    if system is None:
        return None
    stack.enter_context(system)
    g = stack.enter_context(GuestVm.create(system, GuestImage(_loop(), user=user)))
    vcpu = g.create_vcpu().vcpu
    address = _kvm_run_address(stack, vcpu)
    _timed_c_loop(lib, vcpu.fd, address, 1)  # the warm-up exit, as the C program does

    def once() -> tuple[float, float]:
        seconds, cpu = _timed_c_loop(lib, vcpu.fd, address, n)
        return n / seconds, n / cpu

    return once


def _loop() -> Any:
    return out_loop()


def run(report: Report, rounds: int = ROUNDS, n_kvm: int = N_KVM) -> None:
    bench = "1 exit round trip"
    binary = c_baseline("exitloop.c")
    kvm_ok = open_or_none("kvm")
    if kvm_ok is not None:
        kvm_ok.close()
    lib = _exitloop_library() if kvm_ok is not None else None
    with ExitStack() as stack:
        samplers: dict[str, Sampler | None] = {}
        for user, cpl in ((True, "CPL3"), (False, "CPL0")):
            if binary is not None and kvm_ok is not None:
                samplers[f"C KVM_RUN loop, {cpl}"] = _c_sampler(binary, user, n_kvm)
            if lib is not None:
                samplers[f"{INPROC}, {cpl}"] = _inproc_sampler(stack, lib, user, n_kvm)
            samplers[f"kvmgmem kvm, vcpu.run(), {CEXT}, {cpl}"] = _python_sampler(stack, "kvm", user, n_kvm)
            samplers[f"kvmgmem kvm, vcpu.run(), {PURE}, {cpl}"] = _python_sampler(stack, "kvm", user, n_kvm, pure=True)
            samplers[f"bare Python KVM_RUN loop, {cpl}"] = _python_sampler(stack, "kvm", user, n_kvm, raw=True)
        for user, cpl in ((False, "CPL0"), (True, "CPL3")):
            samplers[f"kvmgmem sim, vcpu.run(), {cpl}"] = _python_sampler(stack, "sim", user, N_SIM)
        cpu_best: dict[str, float] = {}

        def wall(name: str, sampler: Sampler) -> Callable[[], float]:
            def once() -> float:
                rate, cpu_rate = sampler()
                cpu_best[name] = max(cpu_best.get(name, 0.0), cpu_rate)
                return rate

            return once

        live = {k: wall(k, v) for k, v in samplers.items() if v is not None}
        best = interleaved(live, rounds)
        taken = rounds
        while taken < 3 * rounds and _loaded(best, cpu_best):
            more = interleaved(live, rounds)  # noise dominated: more rounds, keeping each row's best
            best = {k: max(v, more[k]) for k, v in best.items()}
            taken += rounds
    notes = {
        "C KVM_RUN": "baseline (gcc -O2, same image)",
        INPROC: "diagnostic: exitloop.c's loop as a library in this process, on a vCPU of its own",
        "bare": "diagnostic: ctypes KVM_RUN (no argtypes) on the same vCPU fd, no exit decoding",
        f"kvmgmem kvm, vcpu.run(), {CEXT}": "KVM_RUN + IoExit in kvmgmem.backends.kvm._run (normal install)",
        f"kvmgmem kvm, vcpu.run(), {PURE}": "KVMGMEM_NO_CEXT=1: ctypes + struct + cached IoExits; no target",
        "kvmgmem sim": "ratio vs the C loop on kvm at the same CPL",
    }
    for name in samplers:
        note = next((v for k, v in notes.items() if name.startswith(k)), "")
        note = f"best of {taken} interleaved; {note}".rstrip("; ")
        report.add(Row(bench, name, best.get(name), "exits/s", note=note))
    _ratios_per_cpl(report, bench)
    _cpu_time_notes(report, bench, cpu_best)
    for r in report.rows:
        if r.bench == bench and r.variant.startswith(f"kvmgmem kvm, vcpu.run(), {CEXT}"):
            want = f"≥ {TARGET:.0%} of the C loop"
            cpl = r.variant[-4:]
            shares = [_undisturbed(best, cpu_best, v) for v in (f"C KVM_RUN loop, {cpl}", r.variant)]
            if r.ratio is None:
                judge(r, want, None, "no C baseline")
            elif min(shares) < NOISY:
                judge(r, want, None, f"{r.ratio:.0%}; host loaded: the best wall-clock samples of the C loop and "
                      f"of this row ran at {shares[0]:.0%} and {shares[1]:.0%} of their CPU-time rates")  # fmt: skip
            else:
                judge(r, want, r.ratio >= TARGET, f"{r.ratio:.0%}")


def _undisturbed(best: dict[str, float], cpu_best: dict[str, float], name: str) -> float:
    """Best wall-clock rate over best thread-CPU-time rate of a row: about 1 when one sample ran undisturbed,
    well below when every sample waited for a CPU while other jobs ran (1.0 for a row with no rates)."""
    wall, cpu = best.get(name), cpu_best.get(name)
    return wall / cpu if wall and cpu else 1.0


def _loaded(best: dict[str, float], cpu_best: dict[str, float]) -> bool:
    """Whether the C loop or the judged C-extension row at either CPL had no undisturbed sample."""
    judged = [f"{v}, {cpl}" for cpl in ("CPL3", "CPL0") for v in ("C KVM_RUN loop", f"kvmgmem kvm, vcpu.run(), {CEXT}")]
    return any(_undisturbed(best, cpu_best, name) < NOISY for name in judged)


def _ratios_per_cpl(report: Report, bench: str) -> None:
    """Each variant's ratio is against the C loop at the same CPL (the kernel path differs by CPL)."""
    rows = [r for r in report.rows if r.bench == bench]
    for cpl in ("CPL3", "CPL0"):
        base = next((r for r in rows if r.variant == f"C KVM_RUN loop, {cpl}"), None)
        for r in rows:
            if base and base.value and r.value is not None and r.variant.endswith(cpl):
                r.ratio = r.value / base.value


def paired(pairs: int = 200, chunk: int = 1000) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Diagnostic (``python bench/exits.py --paired``): what the Python side adds per exit over C.

    On one vCPU per CPL, alternate chunks of ``vcpu.run()`` (C extension, typed exits), of the bare ctypes
    KVM_RUN loop, and of ``exitloop.c``'s own loop run in this process on the same vCPU, and take the
    thread-CPU-time difference per exit of each Python loop and the adjacent C chunk. Adjacent chunks share the
    host's noise and the vCPU is the same, so the kernel's round trip cancels out and the median is the Python
    side's own cost, steadier than comparing best-of rates. Returns per CPL, per Python loop, (median, lower
    quartile, upper quartile) in ns per exit."""
    import statistics

    from kvmgmem.backends.kvm.sys_calls import kvm_run_function

    lib = _exitloop_library()
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    if lib is None:
        return out
    for user, cpl in ((False, "CPL0"), (True, "CPL3")):
        with ExitStack() as stack:
            system = open_or_none("kvm")
            if system is None:
                return out
            stack.enter_context(system)
            g = stack.enter_context(GuestVm.create(system, GuestImage(_loop(), user=user)))
            vcpu = g.create_vcpu().vcpu
            vcpu.run()
            address = _kvm_run_address(stack, vcpu)
            c_loop = functools.partial(_c_loop_cpu, lib, vcpu.fd, address)
            diffs = _paired_diffs(vcpu, kvm_run_function(), c_loop, pairs, chunk)
            out[cpl] = {}
            for name, d in diffs.items():
                q = statistics.quantiles(d, n=4)
                out[cpl][name] = (statistics.median(d), q[0], q[2])
    return out


def _c_loop_cpu(lib: Any, fd: int, address: int, n: int) -> float:
    """Thread CPU seconds of ``n`` exits through ``exitloop_timed``."""
    return _timed_c_loop(lib, fd, address, n)[1]


def _paired_diffs(
    vcpu: Any, kvm_run: Any, c_loop: Callable[[int], float], pairs: int, chunk: int
) -> dict[str, list[float]]:
    """Thread-CPU-time difference per exit (ns), Python loop minus C loop, for each adjacent pair of chunks
    (the order alternates so neither side always runs first)."""
    fd, request = vcpu.fd, uapi.KVM_RUN

    def typed() -> float:
        c0 = time.thread_time()
        for _ in range(chunk):
            if not isinstance(vcpu.run(), IoExit):
                raise RuntimeError("unexpected exit")
        return time.thread_time() - c0

    def bare() -> float:
        c0 = time.thread_time()
        for _ in range(chunk):
            if kvm_run(fd, request, 0) < 0:
                raise OSError("KVM_RUN failed")
        return time.thread_time() - c0

    loops = {f"vcpu.run() ({CEXT})": typed, "bare ctypes KVM_RUN": bare}
    diffs: dict[str, list[float]] = {name: [] for name in loops}
    for i in range(pairs):
        for name, python_loop in loops.items():
            if i % 2:
                p = python_loop()
                c = c_loop(chunk)
            else:
                c = c_loop(chunk)
                p = python_loop()
            diffs[name].append((p - c) / chunk * 1e9)
    return diffs


def _cpu_time_notes(report: Report, bench: str, cpu_best: dict[str, float]) -> None:
    """Add each kvm variant's CPU-time ratio to its note: exits per second of its thread's CPU time (guest time
    included), against the C loop's, best of the same rounds. Wall-clock rows on a loaded host also count time
    spent waiting for a CPU, which hits variants unevenly; CPU time leaves that out, so it is the steadier
    cross-check of the per-exit cost (the judged ratio stays the wall-clock one)."""
    for cpl in ("CPL3", "CPL0"):
        base = cpu_best.get(f"C KVM_RUN loop, {cpl}")
        for r in report.rows:
            rate = cpu_best.get(r.variant)
            kvm_row = r.bench == bench and not r.variant.startswith("kvmgmem sim") and r.variant.endswith(cpl)
            if kvm_row and base and rate:
                r.note = f"{r.note}; CPU-time ratio {rate / base:.3f} ({rate:,.0f} exits per CPU second)"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})")
    parser.add_argument("--exits", type=int, default=N_KVM, help=f"exits per kvm sample (default {N_KVM})")
    parser.add_argument("--paired", action="store_true", help="only the paired Python-loop vs C-loop diagnostic")
    args = parser.parse_args()
    if args.paired:
        for cpl, loops in paired().items():
            for name, (median, lo, hi) in loops.items():
                print(f"{cpl}: {name} minus exitloop.c's loop on the same vCPU, thread CPU time per exit: "
                      f"median {median:+.0f} ns (quartiles {lo:+.0f} / {hi:+.0f} ns)")  # fmt: skip
        raise SystemExit(0)
    command = "python bench/exits.py" + (f" --rounds {args.rounds}" if args.rounds != ROUNDS else "")
    command += f" --exits {args.exits}" if args.exits != N_KVM else ""
    rep = Report()
    run(rep, args.rounds, args.exits)
    rep.save("exits", command)
    print(rep.markdown(command))
