"""Raw syscalls through ctypes: ioctl, fallocate.

KVM_RUN must go through ctypes, not ``fcntl.ioctl``: ctypes releases the GIL for the call (so vCPU threads run
in parallel) and returns EINTR to us when a signal kicks the vCPU, whereas ``fcntl.ioctl`` retries EINTR from
Python 3.14 on (gh-132768). Every other ioctl goes the same way so errors are handled in one place.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)

_ioctl_int = _libc.ioctl
_ioctl_int.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl_int.restype = ctypes.c_int

# A second foreign-function object for pointer arguments (ioctl is variadic; both pass in registers).
_ioctl_ptr = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, use_errno=True)(
    ("ioctl", _libc)
)

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
# the same call without dropping the GIL (a PyDLL function): fallocate(..., hold_gil=True)
_fallocate_held = ctypes.PyDLL(None, use_errno=True).fallocate
_fallocate_held.argtypes = _fallocate.argtypes
_fallocate_held.restype = ctypes.c_int


def op_name(request: int) -> str:
    return uapi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: int = 0, *, op: str | None = None) -> int:
    """ioctl with an integer argument; raises KvmError(errno, op) on failure."""
    ret = _ioctl_int(fd, request, arg)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), op or op_name(request))
    return int(ret)


def ioctl_ptr(fd: int, request: int, struct: Any, *, op: str | None = None) -> int:
    """ioctl with a pointer to a ctypes struct (read and/or written by the kernel in place)."""
    ret = _ioctl_ptr(fd, request, ctypes.addressof(struct))
    if ret < 0:
        raise KvmError(ctypes.get_errno(), op or op_name(request))
    return int(ret)


# A third foreign-function object for KVM_RUN's hot loop in the pure-Python path (vcpu.py, when the C extension
# is missing or disabled): no argtypes, so ctypes passes the three Python ints as C ints without running a
# converter per argument (about 0.35 µs per call here). KVM_RUN's number, a vCPU fd and 0 all fit in an int.
_ioctl_run = _libc["ioctl"]  # indexing makes a new function object; attribute access would share _ioctl_int
_ioctl_run.restype = ctypes.c_int


def kvm_run_function() -> Any:
    """The raw ``ioctl`` foreign function for KVM_RUN's hot loop, called as ``f(fd, KVM_RUN, 0)``: returns the
    int result, errno via ``ctypes.get_errno()``; no exception, because a failure may be a memory-fault exit.
    ctypes releases the GIL around the call."""
    return _ioctl_run


def fallocate(fd: int, mode: int, offset: int, length: int, *, hold_gil: bool = False) -> None:
    """fallocate(2); ``hold_gil`` keeps the GIL across the syscall (for a short call made under a lock that
    other Python threads need: dropping the GIL there lets them run into that lock and sleep on it)."""
    if (_fallocate_held if hold_gil else _fallocate)(fd, mode, offset, length) < 0:
        raise KvmError(ctypes.get_errno(), "fallocate", f"mode={mode:#x} offset={offset:#x} length={length:#x}")
