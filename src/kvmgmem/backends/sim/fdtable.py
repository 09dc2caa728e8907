"""Real fd numbers for sim objects, and the ``fget`` the model's guest_memfd bind uses.

Why real fds: raw-int fd tests must behave as on the kernel — a closed fd is EBADF, an open fd that is not a
guest_memfd (``/dev/kvm``, a VM fd, a memfd) is EINVAL — and a real fd guarantees numbers are unique and
not reused while the object lives. Each sim guest_memfd holds a memfd sized like the file (so ``fstat``
reports st_size, st_blksize 4096, mode 0600 and a unique inode); VM, vCPU and system objects hold
``/dev/null``. The guest_memfd's bytes are *not* in that memfd (see ``storage.py``).

Why files are found by the memfd's *inode* and not by fd number: ``dup()`` (the selftests bind a dup'd fd)
gives another number for the same open file, and the kernel's ``fget`` finds the same guest_memfd through
it. For the same reason the file lives as long as any such fd does: when the sim object's own fd closes
while a dup is open, the file becomes an *orphan*, released by ``sweep`` once no fd of this process refers
to it any more (the kernel's "release happens on the last close", ``kvm_gmem_release``). ``sweep`` runs whenever the
sim creates, looks up or closes an fd, so an orphan never outlives the next sim operation.
"""

from __future__ import annotations

import os
import threading

from .core.gmem import GmemFile
from .core.vm import Fd

_lock = threading.Lock()
_Key = tuple[int, int]  # (st_dev, st_ino) of the memfd behind a guest_memfd fd
_gmem_files: dict[_Key, GmemFile] = {}
_orphans: set[_Key] = set()


def placeholder_fd() -> int:
    """A unique real fd standing for a sim object that is not a guest_memfd."""
    sweep()
    return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def gmem_fd(size: int) -> int:
    """A real fd for a guest_memfd: a memfd with st_size = size, mode 0600, no FD_CLOEXEC (as the kernel)."""
    sweep()
    fd = os.memfd_create("kvm-gmem", 0)
    try:
        os.ftruncate(fd, size)
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def _key(st: os.stat_result) -> _Key:
    return st.st_dev, st.st_ino


def register(fd: int, file: GmemFile) -> None:
    key = _key(os.fstat(fd))
    with _lock:
        _gmem_files[key] = file


def _fds_of(key: _Key, exclude: int = -1) -> bool:
    """Whether any fd of this process other than ``exclude`` refers to the memfd ``key``."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # pragma: no cover - /proc is always there on Linux
        return False
    for name in names:
        fd = int(name)
        if fd == exclude:
            continue
        try:
            if _key(os.fstat(fd)) == key:
                return True
        except OSError:  # the listdir's own fd, or closed meanwhile
            continue
    return False


def close_gmem_fd(fd: int, file: GmemFile) -> None:
    """The sim object's fd closes: drop its file reference now, or — if a dup'd fd still refers to the same
    file — leave the file registered as an orphan for ``sweep``."""
    try:
        key = _key(os.fstat(fd))
    except OSError:
        key = None
    still_open = key is not None and _fds_of(key, exclude=fd)
    os.close(fd)
    with _lock:
        if still_open and key is not None:
            _orphans.add(key)
            return
        if key is not None:
            _gmem_files.pop(key, None)
    file.put()
    sweep()


def sweep() -> None:
    """Release orphaned files no fd refers to any more (their last dup was closed)."""
    with _lock:
        if not _orphans:
            return
        candidates = list(_orphans)
    dead: list[GmemFile] = []
    for key in candidates:
        if _fds_of(key):
            continue
        with _lock:
            if key in _orphans:
                _orphans.discard(key)
                file = _gmem_files.pop(key, None)
                if file is not None:
                    dead.append(file)
    for file in dead:
        file.put()


def lookup(fd: int) -> GmemFile | Fd:
    """``fget`` + "is it a guest_memfd": the sim file, or why not."""
    sweep()
    try:
        st = os.fstat(fd)
    except OSError:
        return Fd.NOT_OPEN
    with _lock:
        file = _gmem_files.get(_key(st))
    return file if file is not None else Fd.NOT_GMEM
