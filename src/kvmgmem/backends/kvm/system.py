"""``/dev/kvm``: capabilities, supported CPUID, VM creation."""

from __future__ import annotations

import os
import weakref

from kvmgmem import uapi
from kvmgmem.api import System
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

    def _check_extension(self, cap: int) -> int:
        return ioctl(self.fd, uapi.KVM_CHECK_EXTENSION, cap)

    def _create_vm(self, vm_type: int) -> KvmVm:
        return KvmVm(self, ioctl(self.fd, uapi.KVM_CREATE_VM, vm_type), vm_type)

    def _private_access_bit(self) -> None:
        return None  # a sim-only option: upstream KVM_X86_SW_PROTECTED_VM has no C-bit in the guest's PTEs

    def _get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        if self._cpuid is None:
            nent = 256
            cpuid = uapi.cpuid2_type(nent)()
            cpuid.nent = nent
            ioctl_ptr(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, cpuid)
            self._cpuid = [cpuid.entries[i] for i in range(cpuid.nent)]
        return self._cpuid
