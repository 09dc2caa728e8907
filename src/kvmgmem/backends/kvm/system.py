"""``/dev/kvm``: capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import os
import weakref

from kvmgmem import uapi
from kvmgmem.api import System, u32
from kvmgmem.errors import KvmError

from .sys_calls import ioctl, ioctl_ptr
from .vm import KvmVm

DEV_KVM = "/dev/kvm"


class KvmSystem(System):
    backend = "kvm"

    def __init__(self, path: str = DEV_KVM) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(e.errno or 0, f"open {path}") from None
        try:
            self.api_version = ioctl(self.fd, uapi.KVM_GET_API_VERSION)
            self.vcpu_mmap_size = ioctl(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self._cpuid: list[uapi.kvm_cpuid_entry2] | None = None
        self._finalizer = weakref.finalize(self, os.close, self.fd)  # dropped without close(): no fd leak

    def _release(self) -> None:
        self._finalizer()

    def check_extension(self, cap: int) -> int:
        self._check_open("KVM_CHECK_EXTENSION")
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, u32(cap, "cap", "KVM_CHECK_EXTENSION"))

    def create_vm(self, vm_type: int = 0) -> KvmVm:
        op = "KVM_CREATE_VM"
        self._check_open(op)
        fd = ioctl(self.fd, uapi.KVM_CREATE_VM, u32(vm_type, "vm_type", op))
        return KvmVm(self, fd, vm_type)

    def get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        self._check_open("KVM_GET_SUPPORTED_CPUID")
        if self._cpuid is None:
            nent = 256
            cpuid = uapi.cpuid2_type(nent)()
            cpuid.nent = nent
            ioctl_ptr(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
            self._cpuid = [cpuid.entries[i] for i in range(cpuid.nent)]
        return [type(e).from_buffer_copy(e) for e in self._cpuid]
