"""A stand-in for ``kvmgmem.run.server`` that the preload tests load into a C program (``KVMGMEM_RUN_SERVER``).

It serves ``/dev/kvm`` as a placeholder fd with canned answers and records every call it receives, one line
each with the calling OS thread, in the file named by ``KVMGMEM_FAKE_LOG``, so a test can check what reached
the server and what did not (the interpreter's own calls, a Python thread's munmap).
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import mmap as mmap_module
import os
import threading

KVM_GET_API_VERSION = 0xAE00
KVM_CHECK_EXTENSION = 0xAE03
REQ_FAIL = 0xAEF0  # raises OSError(EINVAL)
REQ_CRASH = 0xAEF1  # raises RuntimeError (EIO, traceback on stderr)
REQ_THREAD = 0xAEF2  # returns the calling thread's OS id

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mark = getattr(_libc, "kvmgmem_preload_mark", None)

_lock = threading.Lock()
_log: object = None
_files: dict[int, str] = {}  # fd -> what it is
_mappings: dict[int, int] = {}  # address -> length, mappings this server made
_python_thread_id = 0
_go = threading.Event()  # set at the first open: the worker then churns while the program runs
_worker: threading.Thread | None = None


def _record(*fields: object) -> None:
    line = " ".join(str(f) for f in (threading.get_native_id(), *fields))
    with _lock:
        os.write(_log, (line + "\n").encode())  # type: ignore[arg-type]


def _own(fd: int, what: str) -> int:
    _files[fd] = what
    if _mark is not None:
        _mark(fd, 1)
    return fd


def _churn() -> None:
    """A thread of Python's own: its mmap/munmap must go to the real libc, never to this server."""
    _go.wait()
    for _ in range(200):
        m = mmap_module.mmap(-1, 4096)
        m[:4] = b"thrd"
        m.close()


def start() -> None:
    global _log, _python_thread_id, _worker
    _log = os.open(os.environ["KVMGMEM_FAKE_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # the interpreter's own opens (one of an emulated path included) must not come back here
    with open("/proc/self/status", "rb") as f:
        f.read()
    try:
        os.close(os.open("/sys/kernel/mm/transparent_hugepage/enabled", os.O_RDONLY))
    except OSError:
        pass
    _worker = threading.Thread(target=_churn, daemon=True)
    _worker.start()
    _python_thread_id = _worker.native_id or 0
    _record("start", os.environ.get("KVMGMEM_RUN_PROFILE"), _python_thread_id)
    atexit.register(_record, "atexit")


def stop() -> None:
    _go.set()
    assert _worker is not None
    _worker.join(10)
    _record("stop", "worker-stuck" if _worker.is_alive() else "worker-done")


def _nothing() -> None:
    """The body of a thread that makes no libc call of its own before it ends."""


def open_path(path: bytes, flags: int, mode: int) -> int:
    _record("open_path", path.decode(), flags)
    _go.set()
    # a short-lived Python thread: CPython unmaps its frame stack after detaching its thread state, with the GIL
    # held; that munmap must go to the real libc (routing it would wait for the GIL the thread holds)
    short = threading.Thread(target=_nothing)
    short.start()
    short.join()
    if path == b"/dev/kvm":
        return _own(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), "kvm")
    if path == b"/sys/module/kvm/parameters/fake_param":
        fd = os.memfd_create("fake_param")
        os.write(fd, b"Y\n")
        os.lseek(fd, 0, os.SEEK_SET)
        return fd  # a real file with the contents, not managed
    if path == b"/sys/module/kvm/parameters/denied":
        raise PermissionError(errno.EACCES, "denied")
    return -1


def ioctl(fd: int, request: int, arg: int) -> int:
    _record("ioctl", fd, hex(request), arg)
    if request == KVM_GET_API_VERSION:
        return 12
    if request == KVM_CHECK_EXTENSION:
        return arg
    if request == REQ_FAIL:
        raise OSError(errno.EINVAL, "bad request")
    if request == REQ_CRASH:
        raise RuntimeError("the fake server's deliberate bug")
    if request == REQ_THREAD:
        return threading.get_native_id()
    raise OSError(errno.ENOTTY, "unknown ioctl")


def close(fd: int) -> int:
    _record("close", fd)
    del _files[fd]
    if _mark is not None:
        _mark(fd, 0)
    os.close(fd)
    return 0


def dup(oldfd: int, newfd: int) -> None:
    _record("dup", oldfd, newfd)
    _own(newfd, _files[oldfd])


def read(fd: int, buf: int, count: int) -> int:
    _record("read", fd, count)
    data = b"kvm!"[:count]
    ctypes.memmove(buf, data, len(data))
    return len(data)


def write(fd: int, buf: int, count: int) -> int:
    _record("write", fd, ctypes.string_at(buf, count).decode())
    return count


def pread(fd: int, buf: int, count: int, offset: int) -> int:
    _record("pread", fd, count, offset)
    ctypes.memset(buf, ord("p"), count)
    return count


def pwrite(fd: int, buf: int, count: int, offset: int) -> int:
    _record("pwrite", fd, ctypes.string_at(buf, count).decode(), offset)
    return count


def lseek(fd: int, offset: int, whence: int) -> int:
    _record("lseek", fd, offset, whence)
    return offset + 1000


def ftruncate(fd: int, length: int) -> int:
    _record("ftruncate", fd, length)
    return 0


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    _record("fallocate", fd, mode, offset, length)
    if length == 0:
        raise OSError(errno.EINVAL, "zero length")
    return 0


def fstat(fd: int, statbuf: int) -> int:
    _record("fstat", fd)
    ctypes.memset(statbuf, 0, 144)  # x86-64 struct stat
    ctypes.c_uint32.from_address(statbuf + 24).value = 0o100600  # st_mode
    ctypes.c_int64.from_address(statbuf + 48).value = 8192  # st_size
    return 0


def mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    _record("mmap", fd, length, prot, flags, offset)
    address = _libc.mmap(
        None,
        length,
        mmap_module.PROT_READ | mmap_module.PROT_WRITE,
        mmap_module.MAP_SHARED | mmap_module.MAP_ANONYMOUS,
        -1,
        0,
    )
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    ctypes.memmove(address, b"MAPPED", 6)
    _mappings[address] = length
    return address


def munmap(addr: int, length: int) -> int:
    mine = addr in _mappings
    _record("munmap", "server" if mine else "program", length)
    if not mine:
        return 0
    del _mappings[addr]
    if _libc.munmap(addr, length) != 0:  # the real munmap: this thread is inside Python
        raise OSError(ctypes.get_errno(), "munmap")
    return 1


def madvise(addr: int, length: int, advice: int) -> int:
    _record("madvise", "server" if addr in _mappings else "program", advice)
    return 0 if addr in _mappings else -2
