"""The kvm backend's ioctl helpers: ioctl with an integer or a struct argument, errors as ``KvmError``.

KVM_RUN must go through ctypes, not ``fcntl.ioctl``: ctypes releases the GIL for the call (so vCPU threads run
in parallel) and returns EINTR to us when a signal kicks the vCPU, whereas ``fcntl.ioctl`` retries EINTR from
Python 3.14 on (gh-132768). Every other ioctl goes the same way so errors are handled in one place. The C
bindings themselves are in :mod:`kvmgmem.libc`, with every other libc function the project calls.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError
from kvmgmem.libc import ioctl_int, ioctl_pointer, ioctl_run


def op_name(request: int) -> str:
    return uapi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: int = 0, *, op: str | None = None) -> int:
    """ioctl with an integer argument; raises KvmError(errno, op) on failure."""
    ret = ioctl_int(fd, request, arg)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), op or op_name(request))
    return int(ret)


def ioctl_ptr(fd: int, request: int, struct: Any, *, op: str | None = None) -> int:
    """ioctl with a pointer to a ctypes struct (read and/or written by the kernel in place)."""
    ret = ioctl_pointer(fd, request, ctypes.addressof(struct))
    if ret < 0:
        raise KvmError(ctypes.get_errno(), op or op_name(request))
    return int(ret)


def kvm_run_function() -> Any:
    """The raw ``ioctl`` foreign function for KVM_RUN's hot loop, called as ``f(fd, KVM_RUN, 0)``: returns the
    int result, errno via ``ctypes.get_errno()``; no exception, because a failure may be a memory-fault exit.
    ctypes releases the GIL around the call."""
    return ioctl_run
