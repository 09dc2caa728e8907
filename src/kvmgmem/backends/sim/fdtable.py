"""Real fd numbers for sim objects, and the ``fget`` the model's guest_memfd bind uses.

Why real fds: raw-int fd tests must behave as on the kernel — a closed fd is EBADF, an open fd that is not a
guest_memfd (``/dev/kvm``, a VM fd, a memfd) is EINVAL — and a real fd guarantees numbers are unique and
not reused while the object lives. Each sim guest_memfd holds a memfd sized like the file (so ``fstat``
reports st_size, st_blksize 4096, mode 0600 and a unique inode); VM, vCPU and system objects hold
``/dev/null``. The guest_memfd's bytes are *not* in that memfd (see ``storage.py``).
"""

from __future__ import annotations

import os
import threading

from .core.gmem import GmemFile
from .core.vm import Fd

_lock = threading.Lock()
_gmem_files: dict[int, GmemFile] = {}


def placeholder_fd() -> int:
    """A unique real fd standing for a sim object that is not a guest_memfd."""
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def gmem_fd(size: int) -> int:
    """A real fd for a guest_memfd: a memfd with st_size = size, mode 0600, no FD_CLOEXEC (as the kernel)."""
    fd = os.memfd_create("kvm-gmem", 0)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def register(fd: int, file: GmemFile) -> None:
    with _lock:
        _gmem_files[fd] = file


def unregister(fd: int) -> None:
    with _lock:
        _gmem_files.pop(fd, None)


def lookup(fd: int) -> GmemFile | Fd:
    """``fget`` + "is it a guest_memfd": the sim file, or why not."""
    with _lock:
        file = _gmem_files.get(fd)
    if file is not None:
        return file
    try:
        os.fstat(fd)
    except OSError:
        return Fd.NOT_OPEN
    return Fd.NOT_GMEM
