"""``copy_from_user`` / ``copy_to_user`` for the program's structs, and the mappings behind an address.

Why not plain ctypes ``from_address``: the program may pass any pointer (NULL, freed, read-only); the kernel
answers EFAULT, while a ctypes read of an unmapped address would crash the program. ``process_vm_readv`` /
``process_vm_writev`` on our own pid copy through the kernel's user-access path, so a bad pointer is EFAULT
and a read-only destination is EFAULT, exactly as ``copy_to_user`` would be.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import TypeVar

from kvmgmem.errors import KvmError
from kvmgmem.libc import iovec, process_vm_readv, process_vm_writev

T = TypeVar("T", bound=ctypes.Structure | ctypes.Array)


def _copy(func: ctypes._CFuncPtr, local: int, remote: int, length: int, op: str) -> None:  # type: ignore[name-defined]
    if length == 0:
        return
    if remote == 0:
        raise KvmError(errno.EFAULT, op, "NULL pointer")
    here = iovec(local, length)
    there = iovec(remote, length)
    done = func(os.getpid(), ctypes.byref(here), 1, ctypes.byref(there), 1, 0)  # our own pid, also after fork
    if done != length:
        raise KvmError(errno.EFAULT, op, f"cannot access {length} bytes at {remote:#x}")


def read_bytes(address: int, length: int, op: str) -> bytes:
    """``length`` bytes of the program's memory at ``address`` (EFAULT where the kernel would fail)."""
    buf = ctypes.create_string_buffer(length)
    _copy(process_vm_readv, ctypes.addressof(buf), address, length, op)
    return buf.raw


def copy_from_user(ctype: type[T], address: int, op: str) -> T:
    """A copy of the ``ctype`` struct the program has at ``address`` (EFAULT for a bad pointer)."""
    value = ctype()
    _copy(process_vm_readv, ctypes.addressof(value), address, ctypes.sizeof(value), op)
    return value


def copy_to_user(address: int, value: ctypes.Structure | ctypes.Array | bytes, op: str) -> None:
    """Write ``value`` (a ctypes object or bytes) to the program's memory at ``address`` (EFAULT if unwritable)."""
    if isinstance(value, bytes):
        buf = ctypes.create_string_buffer(value, len(value))
        _copy(process_vm_writev, ctypes.addressof(buf), address, len(value), op)
    else:
        _copy(process_vm_writev, ctypes.addressof(value), address, ctypes.sizeof(value), op)


def write_field(address: int, value: int, size: int, op: str) -> None:
    """Store an unsigned little-endian integer of ``size`` bytes at ``address`` (e.g. ``nent``)."""
    copy_to_user(address, value.to_bytes(size, "little"), op)


def read_u32(address: int, op: str) -> int:
    """The ``__u32`` at ``address``."""
    return int.from_bytes(read_bytes(address, 4, op), "little")


def mapped_range(start: int, end: int, writable: bool) -> bool:
    """Whether ``[start, end)`` is wholly covered by this process's mappings (and writable, if asked):
    ``/proc/self/maps`` read at the time of the call."""
    if start >= end:
        return False
    covered = start
    try:
        with open("/proc/self/maps", "rb") as maps:
            for line in maps:
                fields = line.split(maxsplit=2)
                lo_s, hi_s = fields[0].split(b"-")
                lo, hi = int(lo_s, 16), int(hi_s, 16)
                if hi <= covered:
                    continue
                if lo > covered:
                    return False
                perms = fields[1]
                if perms[0:1] != b"r" or (writable and perms[1:2] != b"w"):
                    return False
                covered = hi
                if covered >= end:
                    return True
    except OSError:
        return False
    return False
