"""kvmgmem: fd-based private guest memory (KVM guest_memfd) from Python, on real KVM or a software KVM.

Start with :func:`open`::

    import kvmgmem
    with kvmgmem.open() as kvm, kvm.create_vm() as vm:
        gmem = vm.create_guest_memfd(1 << 20, kvmgmem.GUEST_MEMFD_FLAG_MMAP)
"""

from __future__ import annotations

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, System, Vcpu, Vm
from kvmgmem.backends import BACKENDS, open
from kvmgmem.errors import KvmError
from kvmgmem.exits import (
    Exit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)
from kvmgmem.hostmem import HostMemory
from kvmgmem.uapi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM,
    PAGE_SIZE,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "PAGE_SIZE",
    "Exit",
    "GuestMemfd",
    "HltExit",
    "HostMemory",
    "HypercallExit",
    "InternalErrorExit",
    "IoExit",
    "KvmError",
    "MemoryFaultExit",
    "MmioExit",
    "ShutdownExit",
    "System",
    "SystemEventExit",
    "UnknownExit",
    "Vcpu",
    "Vm",
    "open",
    "uapi",
]
