"""A VM on real KVM: memslots, memory attributes, guest_memfds, vCPUs — each ioctl one method."""

from __future__ import annotations

import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, Userspace, Vm, fd_of, u32, u64

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
    working (they pin the kernel's VM object, spec §2.14)."""

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

    def check_extension(self, cap: int) -> int:
        self._check_open("KVM_CHECK_EXTENSION")
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, u32(cap, "cap", "KVM_CHECK_EXTENSION"))

    def create_guest_memfd(self, size: int, flags: int = 0) -> KvmGuestMemfd:
        op = "KVM_CREATE_GUEST_MEMFD"
        self._check_open(op)
        args = uapi.kvm_create_guest_memfd(size=u64(size, "size", op), flags=u64(flags, "flags", op))
        fd = ioctl_ptr(self.fd, uapi.KVM_CREATE_GUEST_MEMFD, args)
        return KvmGuestMemfd(self, fd, args.size, args.flags)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace: Any = None, flags: int = 0
    ) -> None:
        op = "KVM_SET_USER_MEMORY_REGION"
        self._check_open(op)
        region = uapi.kvm_userspace_memory_region(
            slot=u32(slot, "slot", op),
            flags=u32(flags, "flags", op),
            guest_phys_addr=u64(guest_phys_addr, "guest_phys_addr", op),
            memory_size=u64(memory_size, "memory_size", op),
        )
        self._set_region(uapi.KVM_SET_USER_MEMORY_REGION, region, userspace, op)

    def set_user_memory_region2(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace: Any = None,
        flags: int = 0,
        guest_memfd: GuestMemfd | int | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        op = "KVM_SET_USER_MEMORY_REGION2"
        self._check_open(op)
        region = uapi.kvm_userspace_memory_region2(
            slot=u32(slot, "slot", op),
            flags=u32(flags, "flags", op),
            guest_phys_addr=u64(guest_phys_addr, "guest_phys_addr", op),
            memory_size=u64(memory_size, "memory_size", op),
            guest_memfd_offset=u64(guest_memfd_offset, "guest_memfd_offset", op),
            guest_memfd=u32(fd_of(guest_memfd, "guest_memfd", op), "guest_memfd", op),
        )
        self._set_region(uapi.KVM_SET_USER_MEMORY_REGION2, region, userspace, op)

    def _set_region(self, request: int, region: Any, userspace: Any, op: str) -> None:
        """Both region ioctls: fill in the (pinned) userspace address, issue, then track the slot's pin."""
        with self._memslot_update(userspace, op) as user:
            region.userspace_addr = user.address
            ioctl_ptr(self.fd, request, region)
            self._track_slot(region.slot, region.memory_size, user)

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        op = "KVM_SET_MEMORY_ATTRIBUTES"
        self._check_open(op)
        attrs = uapi.kvm_memory_attributes(
            address=u64(address, "address", op),
            size=u64(size, "size", op),
            attributes=u64(attributes, "attributes", op),
            flags=u64(flags, "flags", op),
        )
        ioctl_ptr(self.fd, uapi.KVM_SET_MEMORY_ATTRIBUTES, attrs)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        op = "KVM_ENABLE_CAP"
        self._check_open(op)
        if len(args) > 4:
            raise ValueError(f"{op}: at most 4 args, got {len(args)}")
        enable = uapi.kvm_enable_cap(cap=u32(cap, "cap", op), flags=u32(flags, "flags", op))
        for i, arg in enumerate(args):
            enable.args[i] = u64(arg, f"args[{i}]", op)
        ioctl_ptr(self.fd, uapi.KVM_ENABLE_CAP, enable)

    def create_vcpu(self, vcpu_id: int = 0) -> KvmVcpu:
        op = "KVM_CREATE_VCPU"
        self._check_open(op)
        fd = ioctl(self.fd, uapi.KVM_CREATE_VCPU, u32(vcpu_id, "vcpu_id", op))
        try:
            vcpu = KvmVcpu(self, fd, vcpu_id, self.system.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self._vcpus.append(vcpu)
        return vcpu
