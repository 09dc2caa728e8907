"""``kvmgmem demo``: a confidential VM whose vCPUs convert memory back and forth, watched from the host.

It boots a ``KVM_X86_SW_PROTECTED_VM`` (real KVM where the host has it, the sim elsewhere), runs the
conversion workload of :mod:`kvmgmem.vmm.workload` on every vCPU for ``seconds``, checks at every step that
the host cannot see private memory through any API it has, and ends with a report.

``seconds`` is a limit however big the memory: each vCPU walks its range in ``SLICE_BYTES`` slices and
polls its stop flag after each one, so when the time is up every vCPU finishes the slice in flight (a round's
last slice finishes the round) and the report says how far each got. Stopping at a slice boundary keeps the
verification whole: every slice that ran was filled, converted and checked. Only a vCPU still busy
``STOP_GRACE`` seconds later is kicked out mid-slice, and the report names it. ``--plot`` draws the
guest-physical map over time, ``--trace`` writes a Chrome/Perfetto trace.

Both conversion paths, when the backend can: explicit ``KVM_HC_MAP_GPA_RANGE`` hypercalls on most of each
vCPU's chunk and, on a backend with a private access bit (the sim's SEV-style C-bit, ``private_access_bit``),
implicit conversions — ``KVM_EXIT_MEMORY_FAULT`` on the guest's own private/shared accesses — on the last
``IMPLICIT_MAX`` bytes of it (:func:`~kvmgmem.vmm.workload.mixed_conversion_workload`). The report's
``conversions_by_source`` tells them apart ("hypercall" / "memory-fault"). On kvm only the explicit path runs.
"""

from __future__ import annotations

import errno
import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import kvmgmem
from kvmgmem import uapi
from kvmgmem.api import System
from kvmgmem.errors import KvmError
from kvmgmem.guest.image import PRIVATE_ALIAS_BASE, GuestImage
from kvmgmem.guest.machine import GuestVcpu

from .convert import DiscardPolicy, Region
from .machine import Machine
from .plot import demo_bands
from .trace import Tracer
from .workload import (
    IMPLICIT_ROUNDS,
    PHASE,
    PHASES,
    PRIVATE_BYTE,
    ROUNDS,
    SLICE,
    SLICES,
    STOP,
    SYNC_CHECK_HIDDEN,
    SYNC_CHECK_SHARED,
    Expectations,
    conversion_workload,
    mixed_conversion_workload,
)

RAM_GPA = 4 << 30
SAMPLE_PERIOD = 0.1
SLICE_BYTES = 2 << 20  # the guest polls its stop flag after each slice of this size (workload.SLICE)
STOP_GRACE = 30.0  # seconds a vCPU gets to finish its slice after the time is up before the VMM kicks it
MAX_VCPUS = 64
PRIVATE_ACCESS_BIT = 51  # the sim's C-bit for implicit conversions (SEV's usual position)
IMPLICIT_MAX = 256 << 10  # per vCPU: every page of it is four memory-fault exits per round


_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``, ``2MiB`` → bytes: a whole number with an optional binary unit, nothing else
    (``float()`` would let ``inf`` and ``nan`` through)."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 64M, 1G, 2MiB, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


class DemoError(RuntimeError):
    """The demo cannot run as asked on this host; the message says why in words (no traceback needed)."""


@dataclass
class IsolationLog:
    """Every host attempt to reach private memory, and whether it was refused."""

    attempts: int = 0
    refused: int = 0
    leaks: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attempt(self, what: str, fn: Any) -> None:
        with self._lock:
            self.attempts += 1
        try:
            result = fn()
        except (KvmError, OSError, ValueError) as e:
            if isinstance(e, KvmError) or getattr(e, "errno", None) in (errno.EINVAL, errno.ENODEV, errno.ESPIPE):
                with self._lock:
                    self.refused += 1
                return
            raise
        if isinstance(result, bytes) and PRIVATE_BYTE not in result:
            with self._lock:  # an API that answered without private bytes did not leak them either
                self.refused += 1
            return
        with self._lock:
            self.leaks.append(f"{what} returned {result!r:.60}")

    @property
    def ok(self) -> bool:
        return not self.leaks and self.refused == self.attempts


@dataclass
class DemoReport:
    backend: str
    selection_reason: str
    vcpus: int
    memory: int
    policy: str
    seconds: float
    rounds: list[int]
    conversions: int
    conversions_per_second: float
    conversions_by_source: dict[str, int]
    exits: dict[str, int]
    sim_counters: dict[str, int]
    stores: list[dict[str, Any]]
    punched_bytes: int
    discarded_shared_bytes: int
    isolation_attempts: int
    isolation_refused: int
    leaks: list[str]
    verified: bool
    wall_seconds: float
    private_access_bit: int | None = None  # set when the implicit (memory-fault) path ran
    implicit_bytes_per_vcpu: int = 0
    slices_per_round: int = 1  # explicit slices of SLICE_BYTES in one round of one vCPU
    slices: list[int] = field(default_factory=list)  # explicit slices completed per vCPU, over all rounds
    implicit_rounds: list[int] = field(default_factory=list)  # implicit parts completed (each round starts so)
    kicked: list[int] = field(default_factory=list)  # vCPUs the VMM had to kick out mid-slice (STOP_GRACE)
    punches: int = 0  # fallocate(PUNCH_HOLE) calls over the run
    discards: int = 0  # madvise(MADV_REMOVE) calls over the run
    setup_seconds: float = 0.0  # building the VM, before the workload's clock started
    notes: list[str] = field(default_factory=list)

    def progress_words(self) -> list[str]:
        """How far each vCPU got, in words: "3 rounds", "0 rounds + implicit part and 5/256 slices of round 1"."""
        out = []
        for i, rounds in enumerate(self.rounds):
            done = self.slices[i] - rounds * self.slices_per_round if i < len(self.slices) else 0
            implicit = i < len(self.implicit_rounds) and self.implicit_rounds[i] > rounds
            words = f"{rounds} round{'s' if rounds != 1 else ''}"
            parts = ["implicit part"] if implicit else []
            if done:
                parts.append(f"{done}/{self.slices_per_round} slices")
            if parts:
                words += f" + {' and '.join(parts)} of round {rounds + 1}"
            if i in self.kicked:
                words += " (kicked mid-slice)"
            out.append(words)
        return out

    def progress_summary(self) -> str:
        """``progress_words`` with vCPUs that got equally far named together ("vCPUs 0-7: 2 rounds")."""
        words = self.progress_words()
        groups: list[tuple[int, int, str]] = []
        for i, w in enumerate(words):
            if groups and groups[-1][2] == w:
                groups[-1] = (groups[-1][0], i, w)
            else:
                groups.append((i, i, w))
        if len(groups) == 1 and len(words) > 1:
            return f"every vCPU: {words[0]}"
        return "; ".join(f"vCPU {a}: {w}" if a == b else f"vCPUs {a}-{b}: {w}" for a, b, w in groups)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running demo for a live display: what every vCPU is doing now."""

    elapsed: float  # seconds since the workload started
    seconds: float  # the time limit
    slices_per_round: int
    rounds: list[int]
    slices: list[int]  # explicit slices completed, over all rounds
    phases: list[str]  # workload.PHASES words
    conversions: int
    stopping: bool  # the time is up: vCPUs are finishing their slice

    def line(self) -> str:
        """One line: time, then per vCPU round, slice and step (first-round fills are the populate)."""
        head = f"{self.elapsed:5.1f}/{self.seconds:g} s"
        if self.stopping:
            head += " stopping (finishing the slices in flight)"
        parts = []
        for i, (rounds, slices, phase) in enumerate(zip(self.rounds, self.slices, self.phases, strict=True)):
            if rounds == 0 and phase == PHASES[1]:
                phase = "populating"
            in_round = min(slices - rounds * self.slices_per_round + 1, self.slices_per_round)
            implicit = phase == PHASES[5]  # the implicit range is not one of the slices
            where = f"slice {in_round}/{self.slices_per_round} " if self.slices_per_round > 1 and not implicit else ""
            parts.append(f"vCPU{i} round {rounds + 1} {where}{phase}")
        if len(parts) > 4:  # many vCPUs: a summary, not a line no terminal can show
            counts: dict[str, int] = {}
            for p in self.phases:
                counts[p] = counts.get(p, 0) + 1
            parts = [f"rounds {min(self.rounds)}..{max(self.rounds)}"] + [f"{n} {p}" for p, n in counts.items()]
        return f"{head} | {' | '.join(parts)} | {self.conversions} conversions"


class _Sampler(threading.Thread):
    """Samples rounds per vCPU and the residency of each map chunk while the guest runs."""

    def __init__(self, machine: Machine, rows: Sequence[tuple[int, int]]) -> None:
        super().__init__(name="demo-sampler", daemon=True)
        self.machine = machine
        self.rows = list(rows)  # (offset, size) in the RAM region: the plot's rows
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, list[int], list[bool]]] = []

    def rounds(self) -> list[int]:
        return self.read(ROUNDS)

    def read(self, offset: int) -> list[int]:
        """One u64 of every vCPU's data area (workload.ROUNDS, SLICES, PHASE)."""
        m = self.machine
        return [m.read_u64(m.image.area(i).data + offset) for i in range(len(m.vcpus))]

    def run(self) -> None:
        from kvmgmem.hostmem import resident_bytes

        region = self.machine.regions[0]
        base = region.host.address
        while not self.stop_event.wait(SAMPLE_PERIOD):
            resident = [resident_bytes(base + offset, size) > 0 for offset, size in self.rows]
            self.samples.append((self.machine.tracer.now(), self.rounds(), resident))


def _check_hidden(log: IsolationLog, machine: Machine, region: Region, gpa: int, size: int) -> None:
    """The host tries every API it has on the private range; each must refuse or show no private byte."""
    offset = gpa - region.gpa
    log.attempt("shared view", lambda: machine.read_shared(gpa, size))
    log.attempt("guest_memfd read()", lambda: region.gmem.read(4096))
    log.attempt("guest_memfd pread()", lambda: region.gmem.pread(4096, offset))
    log.attempt("guest_memfd mmap()", lambda: _read_mapping(region, offset))


def _read_mapping(region: Region, offset: int) -> bytes:
    mapping = region.gmem.mmap(uapi.PAGE_SIZE, offset)
    try:
        return bytes(mapping[: uapi.PAGE_SIZE])
    finally:
        mapping.close()


def run_demo(
    *,
    backend: str = "auto",
    vcpus: int = 2,
    memory: int = 64 << 20,
    policy: str = "both",
    seconds: float = 5.0,
    plot: str | None = None,
    trace: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    implicit: bool | None = None,
) -> DemoReport:
    """Run the demo and return its report; ``progress(Progress)`` is called a few times a second meanwhile.

    The workload runs for about ``seconds`` after setup: then every vCPU finishes the slice it is in (a
    round's last slice finishes the round) and the report says how far each got. A vCPU still busy
    ``STOP_GRACE`` seconds later is kicked out and listed in ``kicked``.

    ``implicit``: None = also drive implicit conversions where the backend supports a private access bit
    (the sim), False = explicit hypercalls only, True = require the implicit path (ValueError on kvm).
    Raises ValueError for arguments no run can satisfy and DemoError when this host cannot run the demo."""
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"demo: vcpus must be 1..{MAX_VCPUS}, not {vcpus}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"demo: seconds must be a positive number, not {seconds}")
    if memory <= 0 or memory % uapi.PAGE_SIZE:
        raise ValueError(f"demo: memory must be a positive multiple of 4 KiB, not {memory}")
    discard = DiscardPolicy(policy)
    chunk = memory // vcpus // uapi.PAGE_SIZE * uapi.PAGE_SIZE
    if chunk == 0:
        raise ValueError(f"demo: {memory} bytes of memory cannot be split over {vcpus} vCPUs (4 KiB each at least)")
    implicit_size = min(IMPLICIT_MAX, chunk // 2 // uapi.PAGE_SIZE * uapi.PAGE_SIZE)
    if implicit and implicit_size == 0:
        raise ValueError(f"demo: a {chunk}-byte chunk per vCPU leaves no room for implicit conversions")
    system = _open_system(backend, implicit if implicit_size else False)
    try:
        return _run_demo(system, discard, vcpus, memory, chunk, implicit_size, seconds, plot, trace, progress)
    finally:
        system.close()


def _open_system(backend: str, implicit: bool | None) -> System:
    """Open the backend, with the sim's private access bit unless ``implicit`` is False; DemoError, in the
    words of ``kvmgmem caps``, when it cannot create the confidential VM the demo needs."""
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    if implicit is False or (backend == "kvm" and implicit is None):
        system = kvmgmem.open(backend, vm_type=vm_type)
    elif backend == "kvm":
        raise ValueError("demo: implicit conversions need a private access bit, which only the sim models")
    else:
        system = kvmgmem.open(backend, vm_type=vm_type, private_access_bit=PRIVATE_ACCESS_BIT)
    if vm_type not in system.supported_vm_types:
        from kvmgmem.caps import collect

        try:
            why = [line for line in collect(system).verdict if line.startswith("private memory")]
        finally:
            system.close()
        raise DemoError(f"backend {system.backend} cannot run a confidential VM: "
                        f"{'; '.join(why) or 'no KVM_X86_SW_PROTECTED_VM'} (see `kvmgmem caps`; "
                        "--backend auto picks the sim)")  # fmt: skip
    if implicit and system.private_access_bit is None:
        system.close()
        raise ValueError(f"demo: backend {system.backend} has no private access bit for implicit conversions")
    return system


def _run_demo(
    system: System,
    discard: DiscardPolicy,
    vcpus: int,
    memory: int,
    chunk: int,
    implicit_size: int,
    seconds: float,
    plot: str | None,
    trace: str | None,
    progress: Callable[[Progress], None] | None,
) -> DemoReport:
    bit = system.private_access_bit
    if bit is None:
        implicit_size = 0
    image = _demo_image(discard, vcpus, bit)
    explicit_size = chunk - implicit_size
    slices_per_round = -(-explicit_size // SLICE_BYTES)

    def args(i: int) -> tuple[int, ...]:
        base = RAM_GPA + i * chunk
        if bit is None:
            return (base, chunk)
        return (base, explicit_size, base + explicit_size, implicit_size)

    tracer = Tracer()
    log = IsolationLog()
    failures: list[str] = []
    on_sync = _isolation_checks(log, failures)
    start = time.perf_counter()
    with Machine(
        image,
        system=system,
        vm_type=uapi.KVM_X86_SW_PROTECTED_VM,
        regions=[(RAM_GPA, memory)],
        vcpus=vcpus,
        discard_policy=discard,
        tracer=tracer,
        on_sync=on_sync,
        args=args,
        private_access_bit=bit,
    ) as machine:
        for i in range(vcpus):
            machine.write_u64(machine.image.area(i).data + SLICE, SLICE_BYTES)
        bands = demo_bands(vcpus, chunk, implicit_size, memory)
        sampler = _Sampler(machine, [r for band in bands for r in band.row_ranges()])
        setup = time.perf_counter() - start
        elapsed = _run_for(machine, sampler, progress, seconds, slices_per_round)
        measured = _measured(machine, sampler, tracer, log, failures, elapsed, bit)
        report = DemoReport(
            vcpus=vcpus,
            memory=memory,
            policy=discard.value,
            seconds=seconds,
            private_access_bit=bit,
            implicit_bytes_per_vcpu=implicit_size,
            slices_per_round=slices_per_round,
            setup_seconds=setup,
            **measured,
        )
        kicked = report.kicked
        if kicked:
            report.notes.append(f"vCPUs {kicked} were still in a slice {STOP_GRACE:g} s after the time was up "
                                "and were kicked out of it; that slice is not counted")  # fmt: skip
        if trace:
            tracer.write_chrome_trace(trace)
        if plot:
            from .plot import plot_map

            plot_map(plot, tracer, sampler.samples, machine.regions[0], bands=bands, report=report)
    return report


def _demo_image(discard: DiscardPolicy, vcpus: int, bit: int | None) -> GuestImage:
    """The guest: explicit conversions only, or (with a private access bit) explicit and implicit ones."""
    expect = Expectations.for_policy(discard)
    if bit is None:
        return GuestImage(conversion_workload(expect), nvcpus=vcpus)
    payload = mixed_conversion_workload(expect, PRIVATE_ALIAS_BASE)
    return GuestImage(payload, nvcpus=vcpus, private_alias=bit, private_alias_base=PRIVATE_ALIAS_BASE)


def _isolation_checks(log: IsolationLog, failures: list[str]) -> Callable[[Machine, GuestVcpu, tuple[int, ...]], None]:
    """The SYNC handler that checks isolation when the guest asks: the host's view of memory the guest made
    shared holds the guest's byte (else a line in ``failures``); memory it made private is out of reach
    (``log``)."""

    def on_sync(m: Machine, gv: GuestVcpu, args: tuple[int, ...]) -> None:
        code, gpa, size, byte = args[:4]
        if code == SYNC_CHECK_SHARED:
            view = m.read_shared(gpa, size)
            if view.count(bytes([byte])) != size:
                failures.append(f"vCPU {gv.index}: host view of [{gpa:#x}, +{size:#x}) is not all {byte:#x}")
        elif code == SYNC_CHECK_HIDDEN:
            _check_hidden(log, m, m.regions[0], gpa, size)

    return on_sync


def _measured(
    machine: Machine,
    sampler: _Sampler,
    tracer: Tracer,
    log: IsolationLog,
    failures: list[str],
    elapsed: float,
    bit: int | None,
) -> dict[str, Any]:
    """The ``DemoReport`` fields a finished run measured: conversions, exits, memory use, isolation checks,
    per-vCPU progress (and which vCPUs had to be kicked)."""
    stats = machine.conversions.stats
    conversions = stats.to_private + stats.to_shared
    # Only a kick leaves a vCPU outside its final "done" step; what it did before was checked.
    kicked = [i for i, p in enumerate(sampler.read(PHASE)) if PHASES.get(p) != "done"] if machine.stopped else []
    return {
        "backend": machine.backend,
        "selection_reason": machine.system.selection_reason,
        "rounds": sampler.rounds(),
        "conversions": conversions,
        "conversions_per_second": conversions / elapsed if elapsed else 0.0,
        "conversions_by_source": dict(stats.by_source),
        "exits": dict(machine.exits.counts),
        "sim_counters": _sim_counters(machine),
        "stores": [asdict(u) for u in machine.usage()],
        "punched_bytes": stats.punched_bytes,
        "discarded_shared_bytes": stats.discarded_shared_bytes,
        "isolation_attempts": log.attempts,
        "isolation_refused": log.refused,
        "leaks": log.leaks + failures,
        "verified": log.ok and not failures,
        "wall_seconds": elapsed,
        "slices": sampler.read(SLICES),
        "implicit_rounds": sampler.read(IMPLICIT_ROUNDS) if bit is not None else [],
        "kicked": kicked,
        "punches": tracer.counts.get("punch", 0),
        "discards": tracer.counts.get("discard", 0),
    }


def _run_for(
    machine: Machine,
    sampler: _Sampler,
    progress: Callable[[Progress], None] | None,
    seconds: float,
    slices_per_round: int,
) -> float:
    """Run the vCPUs for ``seconds``, sampling the memory map: then every vCPU is asked to stop at the end of
    its slice, and whoever is still in one ``STOP_GRACE`` later is kicked. Returns the wall seconds run."""
    time_up = threading.Event()
    run_start = time.perf_counter()

    def stop_gently() -> None:
        time_up.set()
        _stop_all(machine)

    timers = [threading.Timer(seconds, stop_gently), threading.Timer(seconds + STOP_GRACE, machine.stop)]
    watcher = _progress_thread(machine, sampler, progress, run_start, seconds, slices_per_round, time_up)
    sampler.start()
    for timer in timers:
        timer.daemon = True
        timer.start()
    try:
        machine.run(timeout=None)
    finally:
        for timer in timers:
            timer.cancel()
        sampler.stop_event.set()
        sampler.join()
        if watcher is not None:  # joined: no refresh may land after the caller clears its line
            watcher[0].set()
            watcher[1].join()
    return time.perf_counter() - run_start


def _stop_all(machine: Machine) -> None:
    for i in range(len(machine.vcpus)):
        machine.write_u64(machine.image.area(i).data + STOP, 1)


def _progress_thread(machine: Machine, sampler: _Sampler, progress: Callable[[Progress], None] | None,
                     start: float, seconds: float, slices_per_round: int,
                     time_up: threading.Event) -> tuple[threading.Event, threading.Thread] | None:  # fmt: skip
    if progress is None:
        return None
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.25):
            stats = machine.conversions.stats
            progress(Progress(
                elapsed=time.perf_counter() - start,
                seconds=seconds,
                slices_per_round=slices_per_round,
                rounds=sampler.read(ROUNDS),
                slices=sampler.read(SLICES),
                phases=[PHASES.get(p, str(p)) for p in sampler.read(PHASE)],
                conversions=stats.to_private + stats.to_shared,
                stopping=time_up.is_set(),
            ))  # fmt: skip

    thread = threading.Thread(target=loop, name="demo-progress", daemon=True)
    thread.start()
    return done, thread


def _sim_counters(machine: Machine) -> dict[str, int]:
    """Fault/zap counters where the backend keeps a snapshot (``Vm.introspect()``, the sim); empty otherwise."""
    snapshot = machine.vm.introspect() if machine.vm is not None else None
    if snapshot is None:
        return {}
    counters = snapshot.get("counters", {})
    return {k: int(v) for k, v in counters.items() if isinstance(v, int)}


def human_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them evenly enough to read: 64 MiB, 256 KiB, 4097 B."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and (n % (1 << shift) == 0 or n >= 10 << shift):
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def print_report(report: DemoReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]kvmgmem demo[/bold] — backend {report.backend} ({report.selection_reason})")
    t = Table(show_header=False)
    t.add_row("vCPUs / memory / policy", f"{report.vcpus} / {human_size(report.memory)} / {report.policy}")
    t.add_row("progress", report.progress_summary())
    t.add_row("round", f"{report.slices_per_round} slice(s) of up to {human_size(SLICE_BYTES)} per vCPU, each "
              "filled, converted, verified; the stop flag is checked between slices")  # fmt: skip
    if report.private_access_bit is None:
        t.add_row("conversion paths", "explicit (KVM_HC_MAP_GPA_RANGE)")
    else:
        implicit = f"{report.implicit_bytes_per_vcpu >> 10} KiB per vCPU, C-bit {report.private_access_bit}"
        t.add_row("conversion paths", f"explicit (KVM_HC_MAP_GPA_RANGE) + implicit (memory faults, {implicit})")
    t.add_row("conversions", f"{report.conversions} ({report.conversions_per_second:,.0f}/s) by source "
              f"{report.conversions_by_source}")  # fmt: skip
    t.add_row("exits", ", ".join(f"{k} {v}" for k, v in sorted(report.exits.items())))
    if report.sim_counters:
        t.add_row("sim counters", ", ".join(f"{k} {v}" for k, v in sorted(report.sim_counters.items())))
    for s in report.stores:
        private = "n/a" if s["private_bytes"] is None else human_size(s["private_bytes"])
        t.add_row(f"store {s['region']} (now)", f"shared holds {human_size(s['shared_bytes'])}, "
                  f"guest_memfd holds {private}")  # fmt: skip
    t.add_row("discarded (cumulative)", f"{human_size(report.punched_bytes)} punched from guest_memfd in "
              f"{report.punches} punches, {human_size(report.discarded_shared_bytes)} of shared memory dropped in "
              f"{report.discards} discards: totals over the whole run, which count a page again each time a "
              f"round converts it (so they can exceed the {human_size(report.memory)} of RAM)")  # fmt: skip
    t.add_row("isolation", f"{report.isolation_refused}/{report.isolation_attempts} host reads of private "
              "memory refused" + (f"; LEAKS: {report.leaks}" if report.leaks else ""))  # fmt: skip
    t.add_row("wall time", f"{report.wall_seconds:.2f} s of workload (limit {report.seconds:g} s, then the slices "
              f"in flight finish) after {report.setup_seconds:.2f} s of setup")  # fmt: skip
    for note in report.notes:
        t.add_row("note", note)
    console.print(t)
    verdict = "[green]VERIFIED[/green]" if report.verified else "[red]FAILED[/red]"
    console.print(f"result: {verdict}")
