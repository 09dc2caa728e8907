"""Server-side state of the kernel objects behind the program's fds (what ``struct kvm``/``kvm_vcpu`` keep
that the Python API does not, because a Python caller never needs it).

- ``VmRef``: a VM and its references — the VM fd's file and one per vCPU file (``kvm_get_kvm`` in
  ``kvm_vm_ioctl_create_vcpu``): the API ``Vm`` is closed only when the last of them goes, so a vCPU keeps
  running after the program closed the VM fd, as on the kernel.
- ``VcpuState``: a vCPU, its ``kvm_run`` area and the exit that waits for the program's reply.
- ``GmemState``: a guest_memfd file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmgmem.api import GuestMemfd, Pending, Vcpu

from .kvm_run_area import KvmRunArea

if TYPE_CHECKING:
    from kvmgmem.backends.sim.vm import SimVm


@dataclass(eq=False)
class VmRef:
    """A VM with its reference count (VM fd file + vCPU files); ``extra`` holds unmodelled VM state.

    ``vm`` is the sim's (the server serves nothing else); ``created_vcpus`` counts the vCPUs this VM fd
    created, closed ones included, as ``kvm->created_vcpus`` (what ``KVM_SET_TSC_KHZ`` and
    ``KVM_SET_IDENTITY_MAP_ADDR`` refuse after)."""

    vm: SimVm
    refs: int = 1
    created_vcpus: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> None:
        """Take a reference (a new vCPU file)."""
        with self.lock:
            self.refs += 1

    def put(self) -> None:
        """Drop a reference; the last one closes the VM (``kvm_put_kvm`` → ``kvm_destroy_vm`` as far as the
        API goes: guest_memfds keep the model VM alive on their own)."""
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.vm.close()


@dataclass(eq=False)
class VcpuState:
    """A vCPU file: the API ``Vcpu``, its VM reference, its ``kvm_run`` area and the pending reply."""

    vcpu: Vcpu
    vm: VmRef
    area: KvmRunArea
    pending: Pending | None = None
    pending_length: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def release(self) -> None:
        """The last fd of the vCPU closed: unmap the server's view, drop the VM reference. The kernel's vCPU
        lives on until the VM goes (its id stays taken: the API counts closed vCPUs)."""
        self.area.close()
        self.vcpu.close()
        self.vm.put()


@dataclass(eq=False)
class GmemState:
    """A guest_memfd file: the API object (its own fd is private to the sim; the program has a dup)."""

    gmem: GuestMemfd
