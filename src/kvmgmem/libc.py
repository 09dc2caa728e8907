"""Every C library function kvmgmem calls, typed once: ``mmap``, ``munmap``, ``mremap``, ``mincore``.

Also ``mprotect``, ``madvise`` (on raw mappings no ``mmap.mmap`` owns), ``fallocate``, ``ioctl`` (the kvm
backend's helpers in ``backends/kvm/sys_calls.py`` wrap it), ``process_vm_readv``/``process_vm_writev``
(``kvmgmem run``'s fault-safe user copies), and the lookup of a function another library loaded into the process
exports (:func:`process_function`).

Why ctypes and not ``mmap.mmap`` alone: the project needs what Python's module does not offer — ``MAP_FIXED``
placement over a reserved range (a guest_memfd mapping is assembled page range by page range), ``mremap``
onto an owned object, ``PROT_NONE`` reservations to steer placement, raw unmaps of ranges no Python object
owns, and ``mincore`` residency. One binding module keeps every caller on the same argument types (a
``c_long`` offset, ``c_void_p`` addresses), so a 64-bit value cannot be truncated in one copy and not in
another.

Two calls also have a binding that keeps the GIL (a ``PyDLL`` function: ``madvise_held``, ``fallocate(...,
hold_gil=True)``), for short calls made under a lock other Python threads need: dropping the GIL there lets them
run into that lock and sleep on it (the sim's guest_memfd storage populates, punches and frees pages under
``mmu_lock``).
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

from kvmgmem.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)
_libc_held = ctypes.PyDLL(None, use_errno=True)  # the same functions, called without dropping the GIL

mmap_ = _libc.mmap
mmap_.restype = ctypes.c_void_p
mmap_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
munmap = _libc.munmap
munmap.restype = ctypes.c_int
munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
mremap = _libc.mremap
mremap.restype = ctypes.c_void_p
mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
mincore = _libc.mincore
mincore.restype = ctypes.c_int
mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
mprotect = _libc.mprotect
mprotect.restype = ctypes.c_int
mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
madvise = _libc.madvise
madvise.restype = ctypes.c_int
madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
#: madvise(2) without dropping the GIL (see the module's docstring).
madvise_held = _libc_held.madvise
madvise_held.restype = ctypes.c_int
madvise_held.argtypes = madvise.argtypes
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fallocate_held = _libc_held.fallocate
_fallocate_held.argtypes = _fallocate.argtypes
_fallocate_held.restype = ctypes.c_int

#: ioctl(2) with an integer argument.
ioctl_int = _libc.ioctl
ioctl_int.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
ioctl_int.restype = ctypes.c_int
#: ioctl(2) with a pointer argument: a second foreign-function object (ioctl is variadic; both pass in registers).
ioctl_pointer = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, use_errno=True)(
    ("ioctl", _libc)
)
#: ioctl(2) for KVM_RUN's hot loop in the kvm backend's pure-Python path (its vcpu.py, when the C extension is
#: missing or disabled): no argtypes, so ctypes passes the three Python ints as C ints without running a converter
#: per argument (about 0.35 µs per call here). KVM_RUN's number, a vCPU fd and 0 all fit in an int.
ioctl_run = _libc["ioctl"]  # indexing makes a new function object; attribute access would share ioctl_int
ioctl_run.restype = ctypes.c_int


class iovec(ctypes.Structure):
    """``struct iovec``: one buffer of a vectored transfer."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


process_vm_readv = _libc.process_vm_readv
process_vm_writev = _libc.process_vm_writev
for _vm_copy in (process_vm_readv, process_vm_writev):
    _vm_copy.restype = ctypes.c_ssize_t
    _vm_copy.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(iovec),
        ctypes.c_ulong,
        ctypes.POINTER(iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]

MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
PROT_NONE = 0  # not in Python 3.11's mmap module
PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23  # Linux 5.14
MADV_COLLAPSE = 25


def failed(raw: int | None) -> bool:
    """Whether an ``mmap``/``mremap`` return value is ``MAP_FAILED``."""
    return raw is None or raw == MAP_FAILED


def c_mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """Call ``mmap(2)``: return the address, or raise ``KvmError(errno, "mmap")``.

    ``offset`` is the u64 a C caller passes (values from 2^63 up reach the kernel as the negative ``off_t``
    they are).
    """
    raw = mmap_(addr, length, prot, flags, fd, offset if offset < 1 << 63 else offset - (1 << 64))
    if failed(raw):
        err = ctypes.get_errno()
        raise KvmError(err, "mmap", f"fd {fd}, length {length:#x}, offset {offset:#x}")
    return int(raw)


def fallocate(fd: int, mode: int, offset: int, length: int, *, hold_gil: bool = False) -> None:
    """Call ``fallocate(2)``, or raise ``KvmError(errno, "fallocate")``.

    ``hold_gil`` keeps the GIL across the syscall (see the module's docstring).
    """
    if (_fallocate_held if hold_gil else _fallocate)(fd, mode, offset, length) < 0:
        raise KvmError(ctypes.get_errno(), "fallocate", f"mode={mode:#x} offset={offset:#x} length={length:#x}")


def process_function(name: str, restype: Any, argtypes: list[Any]) -> Any | None:
    """Return the C function ``name`` a library loaded into this process exports, typed; None when none does.

    The lookup is ``dlsym(RTLD_DEFAULT, name)``: ``kvmgmem run``'s server finds its preload library's hooks this way.
    """
    try:
        func = _libc[name]  # a new function object: typing it does not touch another caller's
    except AttributeError:
        return None
    func.restype = restype
    func.argtypes = argtypes
    return func
