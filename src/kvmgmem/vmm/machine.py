"""``Machine``: a confidential VM the way a real VMM builds and runs one.

Memory layout: a boot region at gpa 0 (the guest image: page tables, GDT/IDT, code, stacks; always shared)
and RAM regions, each one memslot backed by a ``HostMemory`` (the shared side) and **its own guest_memfd**
(the private side). One guest_memfd per region, as QEMU (per RAMBlock), cloud-hypervisor and libkrun do,
rather than alioth's single huge file with offset = gpa: a region's two stores then have the same size and
lifetime, punching and accounting are per region, and nothing depends on a huge sparse file.

Running: one thread per vCPU runs to the next exit and dispatches it — ucall SYNCs to ``on_sync``,
``KVM_HC_MAP_GPA_RANGE`` hypercalls (explicit conversions) and ``KVM_EXIT_MEMORY_FAULT`` (implicit ones) to
the one :class:`~kvmgmem.vmm.convert.ConversionService`. The first failure stops every vCPU and is
re-raised; ``close()`` always releases every fd, mapping and thread (also after Ctrl-C).

Implicit conversions need hardware that reports private/shared per access (SNP's C-bit, TDX's shared bit);
upstream SW_PROTECTED has none (`kvm_mmu_page_fault`). ``private_access_bit=N`` asks the sim for its C-bit model
(``kvmgmem.backends.sim``) and builds the guest image with the matching private alias
(``image.private_va(gpa)``), so the guest's own accesses drive ``KVM_EXIT_MEMORY_FAULT`` conversions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import kvmgmem
from kvmgmem import uapi
from kvmgmem.api import System
from kvmgmem.errors import KvmError
from kvmgmem.exits import Exit, HypercallExit, MemoryFaultExit
from kvmgmem.guest.asm import Asm
from kvmgmem.guest.events import Done, Sync, UnexpectedExitError
from kvmgmem.guest.image import GuestImage
from kvmgmem.guest.machine import GuestVcpu, GuestVm
from kvmgmem.guest.runner import VcpuThreads
from kvmgmem.hostmem import HostMemory, resident_bytes

from .convert import ConversionError, ConversionService, DiscardPolicy, Region
from .trace import Tracer

SyncHandler = Callable[["Machine", GuestVcpu, tuple[int, ...]], None]


class MachineError(RuntimeError):
    """The VMM cannot continue: an exit it must not ignore (unknown memory-fault flags, poison...)."""


@dataclass
class StoreUsage:
    """Bytes each store of a region holds now (measured, see :mod:`kvmgmem.hostmem`)."""

    region: str
    size: int
    shared_bytes: int
    private_bytes: int | None  # None: the backend cannot tell


@dataclass
class ExitCounts:
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1


class Machine:
    """A VM with RAM regions, N vCPUs on threads and a conversion service.

    ``regions`` are (gpa, size) pairs of guest RAM; ``default_private`` makes all RAM private at boot with one
    range-based KVM_SET_MEMORY_ATTRIBUTES per region (QEMU's choice; page-by-page would cost O(pages)).
    ``args`` are the payload arguments of every vCPU, or a function of the vCPU index returning them.
    ``private_access_bit`` (sim only): the C-bit the vCPUs honour and the image's private alias sets; an
    ``Asm`` program gets an image with that alias, a ``GuestImage`` must already have it (``private_alias``),
    and a given ``system`` must have been opened with it. ValueError where that cannot hold (e.g. kvm).
    """

    def __init__(
        self,
        program: Asm | GuestImage,
        *,
        backend: str = "auto",
        vm_type: int = uapi.KVM_X86_SW_PROTECTED_VM,
        regions: Sequence[tuple[int, int]] = ((4 << 30, 64 << 20),),
        vcpus: int = 1,
        discard_policy: DiscardPolicy | str = DiscardPolicy.BOTH,
        default_private: bool = False,
        user: bool = False,
        tracer: Tracer | None = None,
        on_sync: SyncHandler | None = None,
        system: System | None = None,
        args: Sequence[int] | Callable[[int], Sequence[int]] = (),
        private_access_bit: int | None = None,
    ) -> None:
        self.tracer = tracer or Tracer()
        self.policy = DiscardPolicy(discard_policy)
        self.on_sync = on_sync
        self.exits = ExitCounts()
        self.regions: list[Region] = []
        self._own_system = system is None
        self.private_access_bit = private_access_bit
        if system is None:
            system = self._open(backend, vm_type, private_access_bit)
        self.system = system
        self.vm = None
        self.guest: GuestVm | None = None
        self._stop = threading.Event()
        self._threads: VcpuThreads | None = None
        try:
            self.vm = self.system.create_vm(vm_type)
            self._check_private_access_bit(program)
            self._enable_hypercall_exit()
            if isinstance(program, GuestImage):
                image = program
            else:
                image = GuestImage(program, nvcpus=vcpus, user=user, private_alias=private_access_bit)
            self.image = image
            self.guest = GuestVm(self.vm, image, own_vm=False)
            for i, (gpa, size) in enumerate(regions):
                self._add_region(f"ram{i}", 1 + i, gpa, size)
            self.conversions = ConversionService(self.vm, self.regions, self.policy, self.tracer)
            if default_private:
                for region in self.regions:
                    self.vm.set_memory_attributes(region.gpa, region.size, uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)
            for i in range(vcpus):
                self.guest.create_vcpu(i, args=args(i) if callable(args) else args)
        except BaseException:
            self.close()
            raise

    # --- construction ----------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.system.backend

    @staticmethod
    def _open(backend: str, vm_type: int, private_access_bit: int | None) -> System:
        if private_access_bit is None:
            return kvmgmem.open(backend, vm_type=vm_type)
        if backend == "kvm":
            raise ValueError("private_access_bit is a sim-only option: the kvm backend has no C-bit model")
        return kvmgmem.open(backend, vm_type=vm_type, private_access_bit=private_access_bit)

    def _check_private_access_bit(self, program: Asm | GuestImage) -> None:
        bit = self.private_access_bit
        if bit is None:
            return
        assert self.vm is not None
        have = self.vm.private_access_bit  # what its vCPUs honour: None on kvm, or on the sim for a DEFAULT VM
        if have != bit:
            raise ValueError(f"private_access_bit={bit}: this {self.system.backend} VM honours {have} "
                             "(a sim option, for KVM_X86_SW_PROTECTED_VM only)")  # fmt: skip
        if isinstance(program, GuestImage) and program.private_alias != bit:
            raise ValueError(f"private_access_bit={bit}: the image's private alias sets bit {program.private_alias}")

    def _enable_hypercall_exit(self) -> None:
        assert self.vm is not None
        if self.vm.check_extension(uapi.KVM_CAP_EXIT_HYPERCALL) & (1 << uapi.KVM_HC_MAP_GPA_RANGE):
            self.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)

    def _add_region(self, name: str, slot: int, gpa: int, size: int) -> None:
        assert self.vm is not None and self.guest is not None
        host = HostMemory(size)
        try:
            gmem = self.vm.create_guest_memfd(size, 0)
        except BaseException:
            host.close()
            raise
        region = Region(name, slot, gpa, size, host, gmem)
        self.regions.append(region)
        self.guest.add_memory(slot, gpa, host, flags=uapi.KVM_MEM_GUEST_MEMFD, guest_memfd=gmem)

    # --- running ---------------------------------------------------------------------------------------

    def _vcpu_main(self, gv: GuestVcpu) -> None:
        while not self._stop.is_set():
            got = gv.run(timeout=None)
            if isinstance(got, Done):
                self.exits.add("done")
                return
            if isinstance(got, Sync):
                self.exits.add("sync")
                if self.on_sync is not None:
                    self.on_sync(self, gv, got.args)
            elif isinstance(got, HypercallExit):
                self.exits.add("hypercall")
                self._hypercall(gv, got)
            elif isinstance(got, MemoryFaultExit):
                self.exits.add("memory_fault")
                self._memory_fault(gv, got)
            else:
                assert isinstance(got, Exit)
                raise UnexpectedExitError(got, gv.index)

    def _hypercall(self, gv: GuestVcpu, exit: HypercallExit) -> None:
        """KVM_HC_MAP_GPA_RANGE: args = gpa, number of 4 KiB pages, attributes (bit 4 = private)."""
        if exit.nr != uapi.KVM_HC_MAP_GPA_RANGE:
            gv.vcpu.complete_hypercall(-uapi.KVM_ENOSYS)
            return
        gpa, npages, attrs = exit.args[0], exit.args[1], exit.args[2]
        private = bool(attrs & uapi.KVM_MAP_GPA_RANGE_ENCRYPTED)
        try:
            self.conversions.convert(gpa, npages * uapi.PAGE_SIZE, private, source="hypercall", vcpu=gv.index)
        except ConversionError:
            gv.vcpu.complete_hypercall(-uapi.KVM_EINVAL)
        else:
            gv.vcpu.complete_hypercall(0)

    def _memory_fault(self, gv: GuestVcpu, exit: MemoryFaultExit) -> None:
        """An implicit conversion request: the guest accessed a page as private/shared against its attribute."""
        self.tracer.emit("fault", vcpu=gv.index, gpa=exit.gpa, size=exit.size, flags=exit.flags, errno=exit.errno)
        unknown = exit.flags & ~uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE
        if unknown:
            raise MachineError(f"vCPU {gv.index}: memory fault with unknown flags {unknown:#x} at {exit.gpa:#x}")
        if exit.hwpoison:
            raise MachineError(f"vCPU {gv.index}: hardware-poisoned page at gpa {exit.gpa:#x}")
        try:
            self.conversions.convert(exit.gpa, exit.size, exit.private, source="memory-fault", vcpu=gv.index)
        except ConversionError as e:
            raise MachineError(f"vCPU {gv.index}: cannot satisfy memory fault at {exit.gpa:#x}: {e}") from None

    def run(self, timeout: float | None = 60.0) -> float:
        """Run every vCPU to DONE on its own thread; returns the wall time. Re-raises the first failure.

        ``timeout`` None waits for as long as the guest runs: a caller that wants a time limit sets the
        guest's own stop flag and, as a last resort, calls :meth:`stop` from another thread."""
        assert self.guest is not None
        start = time.perf_counter()
        threads = self._threads = self.guest.threads(self._vcpu_main)
        if self._stop.is_set():  # stop() came before the threads existed: do not start the guest at all
            return 0.0
        threads.start()
        try:
            threads.join(timeout)
        except KeyboardInterrupt:
            self._stop.set()
            threads.stop()
            try:
                threads.join(10.0)
            except BaseException:  # the EINTRs of the stop are expected; the interrupt is what we report
                pass
            raise
        return time.perf_counter() - start

    def stop(self) -> None:
        """Make every vCPU leave the guest now (a kick), wherever it is; ``run`` then returns normally.

        A vCPU that leaves this way stops in the middle of whatever its guest was doing; a guest that can
        be asked to stop at a clean point (the demo's stop flag) should be asked first."""
        self._stop.set()
        if self._threads is not None:
            self._threads.stop()  # kicks, and marks the EINTR they cause as expected
        elif self.guest is not None:
            for gv in self.guest.vcpus:
                gv.vcpu.kick()

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called (vCPUs may have left the guest mid-way)."""
        return self._stop.is_set()

    # --- accounting ------------------------------------------------------------------------------------

    def usage(self) -> list[StoreUsage]:
        """Bytes held by each region's shared and private store, measured now."""
        out = []
        for region in self.regions:
            shared = resident_bytes(region.host.address, region.size)
            out.append(StoreUsage(region.name, region.size, shared, region.gmem.allocated_bytes()))
        return out

    @property
    def vcpus(self) -> list[GuestVcpu]:
        return self.guest.vcpus if self.guest is not None else []

    def read_u64(self, gpa: int) -> int:
        """A u64 of shared guest memory (e.g. a vCPU's data area)."""
        assert self.guest is not None
        return self.guest.memory.read_u64(gpa)

    def write_u64(self, gpa: int, value: int) -> None:
        assert self.guest is not None
        self.guest.memory.write(gpa, value.to_bytes(8, "little"))

    def read_shared(self, gpa: int, size: int) -> bytes:
        """The host's (shared) view of guest memory. Private contents are never visible here."""
        assert self.guest is not None
        return self.guest.memory.read(gpa, size)

    # --- lifetime --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release everything: vCPUs, memslots, the VM, guest_memfds, host memory, the system."""
        if self.guest is not None:
            self.guest.close()  # vCPUs, memslots (unpins host memory), image memory
            self.guest = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        for region in self.regions:
            region.gmem.close()
            try:
                region.host.close()
            except KvmError:  # still pinned only if the VM could not delete the slot; the VM is gone now
                pass
        self.regions = []
        if self._own_system:
            self.system.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DiscardPolicy", "Machine", "MachineError", "StoreUsage"]
