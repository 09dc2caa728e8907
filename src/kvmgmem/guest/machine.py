"""A VM with a guest image loaded: the few steps every guest test repeats, in one owner.

``GuestVm`` creates (or adopts) a VM, backs the image with a ``HostMemory`` memslot at gpa 0, remembers every
buffer it maps so ucall arguments can be read at any gpa, and closes everything in the right order (vCPUs,
VM, then the host memory the memslots pinned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Self

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, System, Vcpu, Vm
from kvmgmem.exits import Exit
from kvmgmem.guest.asm import LabelRef
from kvmgmem.guest.events import Done, Event, Sync, UnexpectedExitError
from kvmgmem.guest.image import GuestImage, VcpuArea
from kvmgmem.guest.memory import GuestMemory
from kvmgmem.guest.runner import VcpuThreads, run_until_event
from kvmgmem.hostmem import HostMemory

_2M = 2 << 20


class GuestVcpu:
    """A vCPU of a ``GuestVm``, already in the image's boot state."""

    def __init__(self, machine: GuestVm, vcpu: Vcpu, index: int) -> None:
        self.machine, self.vcpu, self.index = machine, vcpu, index
        self.prints: list[str] = []

    def run(self, timeout: float | None = 10.0) -> Event | Exit:
        """Run to the next SYNC/DONE (an ``Event``) or non-ucall exit (an ``Exit``); failures raise."""
        return run_until_event(
            self.vcpu, self.machine.memory, timeout=timeout, index=self.index, on_print=self.prints.append
        )

    def expect_sync(self, timeout: float | None = 10.0) -> tuple[int, ...]:
        got = self.run(timeout)
        if not isinstance(got, Sync):
            raise UnexpectedExitError(got, self.index)
        return got.args

    def run_to_done(self, timeout: float | None = 10.0) -> None:
        got = self.run(timeout)
        if not isinstance(got, Done):
            raise UnexpectedExitError(got, self.index)

    @property
    def area(self) -> VcpuArea:
        """This vCPU's data area and stacks."""
        return self.machine.image.area(self.index)


class GuestVm:
    """Owns a VM (unless adopted with ``own_vm=False``), the image memslot and the guest vCPUs."""

    def __init__(self, vm: Vm, image: GuestImage, *, slot: int = 0, memory_size: int | None = None,
                 own_vm: bool = True) -> None:  # fmt: skip
        self.vm, self.image, self.own_vm, self.slot = vm, image, own_vm, slot
        self._closed = False
        self.memory = GuestMemory()
        size = max(memory_size or 0, (image.end + _2M - 1) // _2M * _2M)
        self.host = HostMemory(size)
        try:
            image.load(self.host, 0)
            vm.set_user_memory_region(slot, 0, size, self.host)
        except BaseException:
            self.host.close()
            raise
        self.memory.add(0, self.host)
        self._slots = [(slot, 0)]
        self.vcpus: list[GuestVcpu] = []

    @classmethod
    def create(cls, system: System, image: GuestImage, *, vm_type: int = uapi.KVM_X86_DEFAULT_VM,
               **kw: Any) -> GuestVm:  # fmt: skip
        vm = system.create_vm(vm_type)
        try:
            return cls(vm, image, **kw)
        except BaseException:
            vm.close()
            raise

    def add_memory(
        self,
        slot: int,
        gpa: int,
        buffer: Any,
        *,
        flags: int = 0,
        guest_memfd: GuestMemfd | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """Add a memslot backed by ``buffer`` (HostMemory or a gmem mapping) and make it readable here."""
        size = len(buffer)
        userspace: Any = buffer  # HostMemory, any buffer, or a backend's mapping: the memslot pins it
        if guest_memfd is None and not flags:
            self.vm.set_user_memory_region(slot, gpa, size, userspace)
        else:
            self.vm.set_user_memory_region2(slot, gpa, size, userspace, flags, guest_memfd, guest_memfd_offset)
        self._slots.append((slot, gpa))
        self.memory.add(gpa, buffer)

    def create_vcpu(
        self, index: int | None = None, *, entry: LabelRef | int | None = None, args: Sequence[int] = (),
        cpuid: bool = True,
    ) -> GuestVcpu:  # fmt: skip
        """Create vCPU ``index`` (default: the next one) and put it in the image's boot state."""
        index = len(self.vcpus) if index is None else index
        vcpu = self.vm.create_vcpu(index)
        self.image.setup_vcpu(vcpu, index, entry=entry, args=args, cpuid=cpuid)
        gv = GuestVcpu(self, vcpu, index)
        self.vcpus.append(gv)
        return gv

    def threads(self, body: Callable[[GuestVcpu], Any]) -> VcpuThreads:
        """``VcpuThreads`` over this VM's vCPUs (not started)."""
        return VcpuThreads([g.vcpu for g in self.vcpus], lambda i: body(self.vcpus[i]))

    def run_vcpus(self, body: Callable[[GuestVcpu], Any], timeout: float | None = 30.0) -> list[Any]:
        """Run ``body(vcpu)`` for every vCPU on its own thread; the first failure stops the rest and is
        raised here, as is ``GuestTimeoutError`` after ``timeout`` seconds."""
        return self.threads(body).start().join(timeout)

    def close(self) -> None:
        """Close the vCPUs, delete the memslots this object made, close the VM (if owned), drop the buffer
        views and free the image memory.

        The slots are deleted explicitly because closing the VM fd does not end the VM while a guest_memfd
        still references it (the guest_memfd's VM reference (`kvm_gmem_create`)), and a live slot keeps its host memory
        pinned. Buffers passed to ``add_memory`` stay the caller's to close once this returns."""
        if self._closed:
            return
        self._closed = True
        for g in self.vcpus:
            g.vcpu.close()
        if not self.vm.closed:
            for slot, gpa in reversed(self._slots):
                self.vm.set_user_memory_region(slot, gpa, 0, None)
        if self.own_vm:
            self.vm.close()
        self.memory.release()
        self.host.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
