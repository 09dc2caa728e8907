"""``kvmgmem demo``: a confidential VM whose vCPUs convert memory back and forth, watched from the host.

It boots a ``KVM_X86_SW_PROTECTED_VM`` (real KVM where the host has it, the sim elsewhere), runs the
conversion workload of :mod:`kvmgmem.vmm.workload` on every vCPU for ``seconds``, checks at every step that
the host cannot see private memory through any API it has, and ends with a report. ``--plot`` draws the
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
import threading
import time
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
from .trace import Tracer
from .workload import (
    PRIVATE_BYTE,
    ROUNDS,
    STOP,
    SYNC_CHECK_HIDDEN,
    SYNC_CHECK_SHARED,
    Expectations,
    conversion_workload,
    mixed_conversion_workload,
)

RAM_GPA = 4 << 30
SAMPLE_PERIOD = 0.1
PRIVATE_ACCESS_BIT = 51  # the sim's C-bit for implicit conversions (SEV's usual position)
IMPLICIT_MAX = 256 << 10  # per vCPU: every page of it is four memory-fault exits per round


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``4096``, ``2MiB`` → bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = t[-1] if t and t[-1] in units else ""
    number = t[: len(t) - len(suffix)] if suffix else t
    try:
        return int(float(number) * units[suffix])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Sampler(threading.Thread):
    """Samples rounds per vCPU and the residency of each map chunk while the guest runs."""

    def __init__(self, machine: Machine, chunks: int) -> None:
        super().__init__(name="demo-sampler", daemon=True)
        self.machine = machine
        self.chunks = chunks
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, list[int], list[bool]]] = []

    def rounds(self) -> list[int]:
        m = self.machine
        return [m.read_u64(m.image.area(i).data + ROUNDS) for i in range(len(m.vcpus))]

    def run(self) -> None:
        from kvmgmem.hostmem import resident_bytes

        region = self.machine.regions[0]
        size = region.size // self.chunks
        while not self.stop_event.wait(SAMPLE_PERIOD):
            resident = [resident_bytes(region.host.address + i * size, size) > 0 for i in range(self.chunks)]
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
    progress: Any = None,
    implicit: bool | None = None,
) -> DemoReport:
    """Run the demo and return its report (``progress(rounds, conversions)`` is called while it runs).

    ``implicit``: None = also drive implicit conversions where the backend supports a private access bit
    (the sim), False = explicit hypercalls only, True = require the implicit path (ValueError on kvm)."""
    discard = DiscardPolicy(policy)
    chunk = memory // vcpus // uapi.PAGE_SIZE * uapi.PAGE_SIZE
    if chunk == 0:
        raise ValueError(f"demo: {memory} bytes of memory cannot be split over {vcpus} vCPUs")
    implicit_size = min(IMPLICIT_MAX, chunk // 2 // uapi.PAGE_SIZE * uapi.PAGE_SIZE)
    if implicit and implicit_size == 0:
        raise ValueError(f"demo: a {chunk}-byte chunk per vCPU leaves no room for implicit conversions")
    system = _open_system(backend, implicit if implicit_size else False)
    try:
        return _run_demo(system, discard, vcpus, memory, chunk, implicit_size, seconds, plot, trace, progress)
    finally:
        system.close()


def _open_system(backend: str, implicit: bool | None) -> System:
    """Open the backend, with the sim's private access bit unless ``implicit`` is False."""
    vm_type = uapi.KVM_X86_SW_PROTECTED_VM
    if implicit is False or (backend == "kvm" and implicit is None):
        return kvmgmem.open(backend, vm_type=vm_type)
    if backend == "kvm":
        raise ValueError("demo: implicit conversions need a private access bit, which only the sim models")
    system = kvmgmem.open(backend, vm_type=vm_type, private_access_bit=PRIVATE_ACCESS_BIT)
    if implicit and getattr(system, "private_access_bit", None) is None:
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
    progress: Any,
) -> DemoReport:
    bit: int | None = getattr(system, "private_access_bit", None)
    expect = Expectations.for_policy(discard)
    if bit is None:
        implicit_size = 0
        image = GuestImage(conversion_workload(expect), nvcpus=vcpus)
    else:
        payload = mixed_conversion_workload(expect, PRIVATE_ALIAS_BASE)
        image = GuestImage(payload, nvcpus=vcpus, private_alias=bit, private_alias_base=PRIVATE_ALIAS_BASE)
    explicit_size = chunk - implicit_size

    def args(i: int) -> tuple[int, ...]:
        base = RAM_GPA + i * chunk
        if bit is None:
            return (base, chunk)
        return (base, explicit_size, base + explicit_size, implicit_size)

    tracer = Tracer()
    log = IsolationLog()
    failures: list[str] = []

    def on_sync(m: Machine, gv: GuestVcpu, args: tuple[int, ...]) -> None:
        code, gpa, size, byte = args[:4]
        if code == SYNC_CHECK_SHARED:
            view = m.read_shared(gpa, size)
            if view.count(bytes([byte])) != size:
                failures.append(f"vCPU {gv.index}: host view of [{gpa:#x}, +{size:#x}) is not all {byte:#x}")
        elif code == SYNC_CHECK_HIDDEN:
            _check_hidden(log, m, m.regions[0], gpa, size)

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
        sampler = _Sampler(machine, chunks=64)
        sampler.start()
        stopper = threading.Timer(seconds, lambda: _stop_all(machine))
        stopper.daemon = True
        stopper.start()
        watcher = _progress_thread(machine, sampler, progress)
        try:
            machine.run(timeout=seconds + 120)
        finally:
            stopper.cancel()
            sampler.stop_event.set()
            sampler.join()
            if watcher is not None:
                watcher.set()
        elapsed = time.perf_counter() - start
        stats = machine.conversions.stats
        conversions = stats.to_private + stats.to_shared
        report = DemoReport(
            backend=machine.backend,
            selection_reason=machine.system.selection_reason,
            vcpus=vcpus,
            memory=memory,
            policy=discard.value,
            seconds=seconds,
            rounds=sampler.rounds(),
            conversions=conversions,
            conversions_per_second=conversions / elapsed if elapsed else 0.0,
            conversions_by_source=dict(stats.by_source),
            exits=dict(machine.exits.counts),
            sim_counters=_sim_counters(machine),
            stores=[asdict(u) for u in machine.usage()],
            punched_bytes=stats.punched_bytes,
            discarded_shared_bytes=stats.discarded_shared_bytes,
            isolation_attempts=log.attempts,
            isolation_refused=log.refused,
            leaks=log.leaks + failures,
            verified=log.ok and not failures,
            wall_seconds=elapsed,
            private_access_bit=bit,
            implicit_bytes_per_vcpu=implicit_size,
        )
        if trace:
            tracer.write_chrome_trace(trace)
        if plot:
            from .plot import plot_map

            plot_map(plot, tracer, sampler.samples, machine.regions[0], chunks=sampler.chunks, report=report)
    return report


def _stop_all(machine: Machine) -> None:
    for i in range(len(machine.vcpus)):
        machine.write_u64(machine.image.area(i).data + STOP, 1)


def _progress_thread(machine: Machine, sampler: _Sampler, progress: Any) -> threading.Event | None:
    if progress is None:
        return None
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.25):
            stats = machine.conversions.stats
            progress(sampler.rounds(), stats.to_private + stats.to_shared)

    threading.Thread(target=loop, name="demo-progress", daemon=True).start()
    return done


def _sim_counters(machine: Machine) -> dict[str, int]:
    """Fault/zap counters where the backend exposes them (the sim's ``introspect()``); empty otherwise."""
    introspect = getattr(machine.vm, "introspect", None)
    if not callable(introspect):
        return {}
    counters = introspect().get("counters", {})
    return {k: int(v) for k, v in counters.items() if isinstance(v, int)}


def print_report(report: DemoReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]kvmgmem demo[/bold] — backend {report.backend} ({report.selection_reason})")
    t = Table(show_header=False)
    t.add_row("vCPUs / memory / policy", f"{report.vcpus} / {report.memory >> 20} MiB / {report.policy}")
    t.add_row("rounds per vCPU", ", ".join(map(str, report.rounds)))
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
        private = "n/a" if s["private_bytes"] is None else f"{s['private_bytes'] >> 10} KiB"
        t.add_row(f"store {s['region']}", f"shared holds {s['shared_bytes'] >> 10} KiB, guest_memfd holds {private}")
    t.add_row("discarded", f"punched {report.punched_bytes >> 20} MiB of guest_memfd, "
              f"dropped {report.discarded_shared_bytes >> 20} MiB of shared memory")  # fmt: skip
    t.add_row("isolation", f"{report.isolation_refused}/{report.isolation_attempts} host reads of private "
              "memory refused" + (f"; LEAKS: {report.leaks}" if report.leaks else ""))  # fmt: skip
    t.add_row("wall time", f"{report.wall_seconds:.2f} s")
    console.print(t)
    verdict = "[green]VERIFIED[/green]" if report.verified else "[red]FAILED[/red]"
    console.print(f"result: {verdict}")
