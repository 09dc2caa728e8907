"""A VM on real KVM: memslots, memory attributes, guest_memfds, vCPUs — each ioctl one method."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.api import Userspace, Vm

from .gmem import KvmGuestMemfd
from .sys_calls import ioctl, ioctl_ptr
from .vcpu import KvmVcpu

if TYPE_CHECKING:
    from .system import KvmSystem


def _drop_vm(fd: int, slot_users: dict[int, Userspace], lock: threading.Lock, key: int) -> None:
    """Close the VM fd and let go of the host memory its memslots pinned.

    Runs from ``close()`` or when the VM is garbage-collected without one. Once the VM fd is closed no vCPU
    is left (each holds its VM), so no guest can reach a memslot's host memory any more — even while a
    guest_memfd keeps the kernel's VM, memslots included, alive (``__kvm_gmem_create`` takes a reference on
    it). It must not reference the ``KvmVm``: a finalizer that did would keep it alive forever.
    """
    os.close(fd)
    with lock:
        for slot, user in slot_users.items():
            user.unpin((key, slot))
        slot_users.clear()


class KvmVm(Vm):
    """Owns the VM fd. Closing it closes the vCPUs created here but not the guest_memfds, which keep
    working (each holds a reference on the kernel's VM, taken in ``kvm_gmem_create``)."""

    system: KvmSystem

    def __init__(self, system: KvmSystem, fd: int, vm_type: int) -> None:
        super().__init__()
        self.system = system
        self.fd = fd
        self.vm_type = vm_type
        # Dropped without close(): no fd leak, and the memslots' host memory is unpinned (HostMemory.close()
        # would otherwise be refused forever, naming a VM nobody can reach).
        self._finalizer = weakref.finalize(self, _drop_vm, fd, self._slot_users, self._slot_lock, id(self))

    def _release(self) -> None:
        for vcpu in self._vcpus:
            vcpu.close()
        self._finalizer()

    def _check_extension(self, cap: int) -> int:
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def _create_guest_memfd(self, args: uapi.kvm_create_guest_memfd) -> KvmGuestMemfd:
        fd = ioctl_ptr(self.fd, uapi.KVM_CREATE_GUEST_MEMFD, args)
        return KvmGuestMemfd(self, fd, args.size, args.flags)

    def _set_user_memory_region(self, region: uapi.kvm_userspace_memory_region, user: Userspace) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, region)

    def _set_user_memory_region2(self, region: uapi.kvm_userspace_memory_region2, user: Userspace) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_USER_MEMORY_REGION2, region)

    def _set_memory_attributes(self, attrs: uapi.kvm_memory_attributes) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_MEMORY_ATTRIBUTES, attrs)

    def _enable_cap(self, cap: uapi.kvm_enable_cap) -> None:
        ioctl_ptr(self.fd, uapi.KVM_ENABLE_CAP, cap)

    def _create_irqchip(self) -> None:
        ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP, 0)

    def _get_tsc_khz(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_TSC_KHZ, 0)

    def _set_nr_mmu_pages(self, pages: int) -> None:
        ioctl(self.fd, uapi.KVM_SET_NR_MMU_PAGES, pages)

    def _private_access_bit(self) -> None:
        return None  # a sim-only option: upstream KVM_X86_SW_PROTECTED_VM has no C-bit in the guest's PTEs

    def _introspect(self) -> None:
        return None  # the kernel shows no SPTEs or memslot internals to userspace

    def _create_vcpu(self, vcpu_id: int) -> KvmVcpu:
        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = KvmVcpu(self, fd, vcpu_id, self.system.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu
