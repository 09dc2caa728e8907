"""The program's KVM fds: real placeholder fds standing for kernel files, with the kernel's reference rules.

Why real fds: the program sees the numbers the kernel would give (the lowest free one), ``close``/``dup``
work on them with libc, ``/proc/self/fd`` lists them, and a closed number is free for reuse — all for free.
Each placeholder is a memfd named as the kernel names the anon inode (``kvm-vm``, ``kvm-vcpu:0``), except a
guest_memfd's, which is a ``dup`` of the sim's own guest_memfd fd: the sim finds a guest_memfd by its inode
(``backends/sim/fdtable.py``), so the program's number binds in ``KVM_SET_USER_MEMORY_REGION2`` as on the
kernel, dup'd or not.

Reference rules (``struct file`` and ``kvm_get_kvm``): every fd number refers to one open file; ``dup``
shares it; the file is released when its last fd closes (``fput`` → ``release``). A vCPU file holds its VM
(``kvm_vm_ioctl_create_vcpu`` takes a VM reference), so the VM lives while any vCPU fd is open even after
the VM fd closed; a guest_memfd holds the VM too, which the API models itself (``GuestMemfd`` outlives
``Vm.close``).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kvmgmem import libc
from kvmgmem.errors import KvmError


class FileKind(enum.Enum):
    """What an fd refers to: the kind decides which ioctl table and which file operations apply."""

    SYSTEM = "kvm"  # /dev/kvm
    VM = "kvm-vm"
    VCPU = "kvm-vcpu"
    GMEM = "kvm-gmem"
    SYSFS = "sysfs"  # an emulated /sys file (a memfd holding the content)


@dataclass(eq=False)
class KvmFile:
    """One open file (``struct file``): the object behind it and how many fds share it.

    ``obj`` is the API object (``System``, ``Vm``, ``Vcpu``, ``GuestMemfd``) or a server-side state object
    wrapping it; ``release`` runs once, when the last fd closes (``file_operations.release``)."""

    kind: FileKind
    obj: Any
    release: Callable[[], None] | None = None
    fds: set[int] = field(default_factory=set)
    released: bool = False
    #: Calls in progress on the file (``fdget`` references): a close during a KVM_RUN in another thread
    #: releases the file only when that call returns, as ``fput`` after ``fdput`` does.
    users: int = 0


def _mark_function() -> Callable[[int, int], None] | None:
    """``kvmgmem_preload_mark`` of the preload library when it is loaded into this process, else None."""
    func: Callable[[int, int], None] | None = libc.process_function(
        "kvmgmem_preload_mark", None, [ctypes.c_int, ctypes.c_int]
    )
    return func


class FdTable:
    """fd number → ``KvmFile``, thread-safe; tells the preload library which fds are the server's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[int, KvmFile] = {}
        self._mark = _mark_function()

    def _set_mark(self, fd: int, managed: bool) -> None:
        if self._mark is not None:
            self._mark(fd, 1 if managed else 0)

    def install(self, fd: int, kind: FileKind, obj: Any, release: Callable[[], None] | None = None) -> KvmFile:
        """Give the real fd ``fd`` (already created) to a new file for ``obj`` (``fd_install``)."""
        file = KvmFile(kind, obj, release, {fd})
        with self._lock:
            self._files[fd] = file
        self._set_mark(fd, True)
        return file

    def get(self, fd: int, op: str) -> KvmFile:
        """The file behind ``fd`` (``fdget``): EBADF when it is not one of the server's."""
        with self._lock:
            file = self._files.get(fd)
        if file is None:
            raise KvmError(errno.EBADF, op, f"fd {fd} is not a KVM fd of this process")
        return file

    @contextlib.contextmanager
    def use(self, fd: int, op: str) -> Iterator[KvmFile]:
        """The file behind ``fd`` held for the duration of one call (``fdget``/``fdput``); EBADF if not ours."""
        with self._lock:
            file = self._files.get(fd)
            if file is not None:
                file.users += 1
        if file is None:
            raise KvmError(errno.EBADF, op, f"fd {fd} is not a KVM fd of this process")
        try:
            yield file
        finally:
            with self._lock:
                file.users -= 1
                last = self._last_reference(file)
            if last and file.release is not None:
                file.release()

    def _last_reference(self, file: KvmFile) -> bool:
        """Whether ``file`` just lost its last fd and call (caller holds the lock); marks it released."""
        if file.fds or file.users or file.released:
            return False
        file.released = True
        return True

    def lookup(self, fd: int) -> KvmFile | None:
        """The file behind ``fd``, or None."""
        with self._lock:
            return self._files.get(fd)

    def dup(self, oldfd: int, newfd: int) -> None:
        """The program dup'd ``oldfd`` to ``newfd`` (the real dup is done): both share one file."""
        with self._lock:
            file = self._files.get(oldfd)
            if file is None:
                return
            stale = self._files.get(newfd)
            self._files[newfd] = file
            file.fds.add(newfd)
        if stale is not None and stale is not file:  # dup2 onto one of our fds that C did not close first
            self._drop(stale, newfd)
        self._set_mark(newfd, True)

    def close(self, fd: int) -> None:
        """``close(fd)``: closes the real fd and drops the file's reference (EBADF if not ours)."""
        with self._lock:
            file = self._files.pop(fd, None)
        if file is None:
            raise KvmError(errno.EBADF, "close", f"fd {fd} is not a KVM fd of this process")
        self._set_mark(fd, False)
        try:
            os.close(fd)
        finally:
            self._drop(file, fd)

    def _drop(self, file: KvmFile, fd: int) -> None:
        with self._lock:
            file.fds.discard(fd)
            last = self._last_reference(file)
        if last and file.release is not None:
            file.release()

    def files(self) -> list[KvmFile]:
        """Every open file (for tracing and the final cleanup)."""
        with self._lock:
            return list({id(f): f for f in self._files.values()}.values())

    def fds(self) -> list[int]:
        """Every fd number the server manages."""
        with self._lock:
            return list(self._files)


def placeholder(name: str, size: int = 0, cloexec: bool = True) -> int:
    """A new real fd for a kernel file named ``name`` (a memfd of ``size`` bytes): the lowest free number."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC if cloexec else 0)
    if size:
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
    return fd
