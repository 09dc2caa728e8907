"""The sim behind a C program's ``/dev/kvm``: the syscall-level entry points the preload library calls.

``kvmgmem run PROGRAM`` preloads a C library into PROGRAM that embeds Python; it routes the program's libc
calls on KVM fds here (the contract: module-level functions taking and returning plain ints; an ``OSError``
becomes ``-1`` with its errno). The program runs in this same process, so struct pointers are read and
written in place (``user.py``), a memslot's ``userspace_addr`` is the program's own memory
(``guest_memory.py``), and every KVM fd is a real fd the program can close and dup (``fds.py``).

One ``Server`` holds one sim ``System`` (``kvmgmem.open("sim", profile=...)``) for every open of
``/dev/kvm``: like the kernel's, the device has no per-open state, so opening it — which the selftests do
once per capability check — costs one memfd.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import mmap as _mmap
import os
import stat
import threading
import weakref
from typing import TYPE_CHECKING, Any

from kvmgmem.errors import KvmError
from kvmgmem.libc import (
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MADV_REMOVE,
    MAP_FIXED,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    c_mmap,
    failed,
    mprotect,
    mremap,
)
from kvmgmem.libc import munmap as _munmap

from . import abi, ioctls, kicks, sysfs
from .fds import FdTable, FileKind, KvmFile, placeholder
from .guest_memory import MemoryMap, ProgramMapping
from .objects import GmemState, VmRef

if TYPE_CHECKING:
    from kvmgmem.backends.sim.vm import SimVm

#: ``madvise`` returns this for "not mine: do the real call" (contract with the preload library).
NOT_MINE = -2
MADV_FREE = 8
MADV_DONTNEED_LOCKED = 24
#: Advice that drops the pages of a range (the mmu notifier runs for them, ``zap_page_range_single``).
DISCARDING_ADVICE = frozenset({MADV_DONTNEED, MADV_FREE, MADV_REMOVE, MADV_DONTNEED_LOCKED})
MAP_SHARED_VALIDATE = 0x03
MAP_FIXED_NOREPLACE = 0x100000
MAP_TYPE = 0x0F


def _fioclex(fd: int, arg: int) -> int:
    os.set_inheritable(fd, False)
    return 0


def _fionclex(fd: int, arg: int) -> int:
    os.set_inheritable(fd, True)
    return 0


def _fionbio(fd: int, arg: int) -> int:
    from .user import read_u32

    os.set_blocking(fd, not read_u32(arg, "FIONBIO"))
    return 0


def _fioasync(fd: int, arg: int) -> int:
    from .user import read_u32

    read_u32(arg, "FIOASYNC")  # KVM files have no fasync: the flag changes nothing they do
    return 0


#: ioctls ``do_vfs_ioctl`` handles for every file before the driver sees the request.
VFS_IOCTLS = {0x5451: _fioclex, 0x5450: _fionclex, 0x5421: _fionbio, 0x5452: _fioasync}


class Server:
    """The state behind the program's KVM fds: the sim, the fd table, its guest_memfd mappings, the trace."""

    def __init__(self, profile: str = "6.18", trace_path: str | None = None) -> None:
        import kvmgmem

        self.system = kvmgmem.open("sim", profile=profile)
        self.table = FdTable()
        self._vms: weakref.WeakSet[SimVm] = weakref.WeakSet()
        self._vms_lock = threading.Lock()
        self.memory = MemoryMap(self._live_vms)
        self.kicks = kicks.watcher()
        self.trace_path = trace_path
        self.tracer: Any = None
        self._trace_dirty = False
        if trace_path:
            from kvmgmem.vmm.trace import Tracer

            self.tracer = Tracer()

    # --- bookkeeping used by the handlers ---------------------------------------------------------------

    def add_vm(self, ref: VmRef) -> None:
        """Remember a VM for the mmu notifier (weakly: a closed VM drops out by itself)."""
        with self._vms_lock:
            self._vms.add(ref.vm)

    def _live_vms(self) -> list[SimVm]:
        with self._vms_lock:
            return [vm for vm in self._vms if not vm.closed]

    @staticmethod
    def dup_noexec(fd: int) -> int:
        """A dup of ``fd`` without FD_CLOEXEC (``F_DUPFD``; ``os.dup`` would set it)."""
        return fcntl.fcntl(fd, fcntl.F_DUPFD, 0)

    @staticmethod
    def os_close(fd: int) -> None:
        """Close a real fd the server made but never handed out."""
        os.close(fd)

    def trace_now(self) -> float:
        """The tracer's clock (0 when not tracing)."""
        return self.tracer.now() if self.tracer is not None else 0.0

    def trace_exit(self, vcpu_id: int, start: float, args: dict[str, Any]) -> None:
        """Record one KVM_RUN (entry to exit) on the vCPU's track."""
        if self.tracer is not None:
            self.tracer.emit("KVM_RUN", start=start, vcpu=vcpu_id, **args)
            self._trace_dirty = True

    def _trace_call(self, name: str, start: float, **args: Any) -> None:
        if self.tracer is not None:
            self.tracer.emit(name, start=start, **args)
            self._trace_dirty = True

    def write_trace(self) -> None:
        """Write the Chrome/Perfetto trace (``kvmgmem.vmm.trace.Tracer``'s format) if anything is new."""
        if self.tracer is not None and self.trace_path and self._trace_dirty:
            self._trace_dirty = False
            self.tracer.write_chrome_trace(self.trace_path)

    # --- entry points -------------------------------------------------------------------------------------

    def open_path(self, path: bytes, flags: int, mode: int) -> int:
        """``open``: ``/dev/kvm`` → a new KVM system fd; an emulated sysfs file → its fd; else -1."""
        name = os.fsdecode(path)
        if name == "/dev/kvm":
            fd = placeholder("kvm", cloexec=bool(flags & os.O_CLOEXEC))
            self.table.install(fd, FileKind.SYSTEM, self.system)
            return fd
        if name.startswith(("/sys/module/kvm", "/sys/kernel/mm/transparent_hugepage/")):
            return sysfs.open_emulated(name, flags)
        return -1

    def ioctl(self, fd: int, request: int, arg: int) -> int:
        """``ioctl``: dispatch by fd kind and request number (``ioctls.TABLES``)."""
        with self.table.use(fd, "ioctl") as file:
            return self._dispatch(file, fd, request, arg)

    def _dispatch(self, file: KvmFile, fd: int, request: int, arg: int) -> int:
        request &= 0xFFFFFFFF  # the kernel's ioctl command is an unsigned int
        generic = VFS_IOCTLS.get(request)
        if generic is not None:  # do_vfs_ioctl answers these before the file's own ioctl
            return generic(fd, arg)
        handler = ioctls.TABLES[file.kind].get(request)
        name = abi.ioctl_name(request)
        if handler is None:
            raise KvmError(ioctls.UNKNOWN_ERRNO[file.kind], name, f"not an ioctl of a {file.kind.value} fd")
        start = self.trace_now()
        try:
            result = handler(self, file.obj, arg)
        except OSError as e:
            if request != ioctls.uapi.KVM_RUN:
                self._trace_call(name, start, fd=fd, error=errno.errorcode.get(e.errno or 0, e.errno))
            raise
        if request != ioctls.uapi.KVM_RUN:
            self._trace_call(name, start, fd=fd, result=result)
        return result

    def close(self, fd: int) -> int:
        """``close``: the fd goes; the file is released with its last fd."""
        self.table.close(fd)
        if self.tracer is not None and not self.table.fds():
            self.write_trace()
        return 0

    def dup(self, oldfd: int, newfd: int) -> None:
        """``dup``/``dup2``/``dup3``/``F_DUPFD``: done by C; ``newfd`` now shares ``oldfd``'s file."""
        self.table.dup(oldfd, newfd)

    def read(self, fd: int, buf: int, count: int) -> int:
        """``read``: no KVM file has a read operation (EINVAL: ``vfs_read`` without FMODE_CAN_READ)."""
        file = self._file(fd, "read")
        if file.kind is FileKind.GMEM:
            file.obj.gmem.read(count)
        raise KvmError(errno.EINVAL, "read", f"a {file.kind.value} fd has no read operation")

    def write(self, fd: int, buf: int, count: int) -> int:
        """``write``: EINVAL, as ``read``."""
        file = self._file(fd, "write")
        if file.kind is FileKind.GMEM:
            file.obj.gmem.write(b"")
        raise KvmError(errno.EINVAL, "write", f"a {file.kind.value} fd has no write operation")

    def pread(self, fd: int, buf: int, count: int, offset: int) -> int:
        """``pread``: guest_memfd as the API says; /dev/kvm EINVAL; VM and vCPU fds ESPIPE (measured)."""
        return self._positional(fd, "pread", offset)

    def pwrite(self, fd: int, buf: int, count: int, offset: int) -> int:
        """``pwrite``: as ``pread``."""
        return self._positional(fd, "pwrite", offset)

    def _positional(self, fd: int, op: str, offset: int) -> int:
        file = self._file(fd, op)
        if file.kind is FileKind.GMEM:
            gmem = file.obj.gmem
            if op == "pread":
                gmem.pread(0, offset)
            else:
                gmem.pwrite(b"", offset)
        if file.kind is FileKind.SYSTEM:
            raise KvmError(errno.EINVAL, op, "/dev/kvm has no read/write operation")
        raise KvmError(errno.ESPIPE, op, f"a {file.kind.value} fd is not seekable")

    def lseek(self, fd: int, offset: int, whence: int) -> int:
        """``lseek``: /dev/kvm, VM and vCPU fds use ``noop_llseek`` (the position, 0); guest_memfd has no
        llseek (ESPIPE)."""
        file = self._file(fd, "lseek")
        if file.kind is FileKind.GMEM:
            raise KvmError(errno.ESPIPE, "lseek", "guest_memfd is not seekable")
        return 0

    def ftruncate(self, fd: int, length: int) -> int:
        """``ftruncate``: guest_memfd refuses every size change; other KVM files are not regular (EINVAL)."""
        file = self._file(fd, "ftruncate")
        if file.kind is FileKind.GMEM:
            file.obj.gmem.truncate(length)
        raise KvmError(errno.EINVAL, "ftruncate", f"a {file.kind.value} fd cannot be truncated")

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> int:
        """``fallocate``: guest_memfd's (``kvm_gmem_fallocate``); other KVM files ENODEV (``vfs_fallocate``)."""
        file = self._file(fd, "fallocate")
        if file.kind is not FileKind.GMEM:
            raise KvmError(errno.ENODEV, "fallocate", f"a {file.kind.value} fd is not a regular file")
        file.obj.gmem.fallocate(mode, offset, length)
        return 0

    def fstat(self, fd: int, statbuf: int) -> int:
        """``fstat``: fill the x86-64 ``struct stat`` at ``statbuf``."""
        from .user import copy_to_user

        file = self._file(fd, "fstat")
        copy_to_user(statbuf, _stat_struct(file, fd), "fstat")
        return 0

    def mmap(self, addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        """``mmap`` of a KVM fd: a vCPU's ``kvm_run`` area, or a guest_memfd (``kvm_gmem_mmap``'s rules:
        ENODEV without GUEST_MEMFD_FLAG_MMAP, EINVAL for MAP_PRIVATE); /dev/kvm and VM fds ENODEV."""
        file = self._file(fd, "mmap")
        if file.kind is FileKind.VCPU:
            return c_mmap(addr or None, length, prot, flags, fd, offset)
        if file.kind is not FileKind.GMEM:
            raise KvmError(errno.ENODEV, "mmap", f"a {file.kind.value} fd cannot be mapped")
        fixed = bool(flags & (MAP_FIXED | MAP_FIXED_NOREPLACE))
        shared = flags & MAP_TYPE in (_mmap.MAP_SHARED, MAP_SHARED_VALIDATE)
        owner = file.obj.gmem.mmap(length, offset, shared)
        address = owner.address
        try:
            if fixed:  # the program's address: a duplicate of the owner's pages there
                moved = mremap(owner.address, 0, owner.size, MREMAP_MAYMOVE | MREMAP_FIXED, addr)
                if failed(moved):
                    raise KvmError(ctypes.get_errno(), "mmap", f"MAP_FIXED at {addr:#x}")
                address = addr
            if prot != _mmap.PROT_READ | _mmap.PROT_WRITE and mprotect(address, owner.size, prot):
                raise KvmError(ctypes.get_errno(), "mmap", "mprotect")
        except BaseException:
            owner.close()
            raise
        self.memory.add(ProgramMapping(address, owner.size, owner))
        return int(address)

    def munmap(self, addr: int, length: int) -> int:
        """``munmap`` (before the real one): the mmu notifier for the range; guest_memfd mappings inside it
        are released. 1 when the range was exactly one server-owned mapping (the server unmapped it), else 0:
        the preload library unmaps (aliases and anything else in the range)."""
        self.memory.invalidate(addr, length, unmap=True)
        end = addr + -(-length // _mmap.PAGESIZE) * _mmap.PAGESIZE
        inside = self.memory.take_within(addr, end)
        for mapping in inside:
            mapping.release()
        exact = len(inside) == 1 and not inside[0].alias and (inside[0].address, inside[0].size) == (addr, end - addr)
        return 1 if exact else 0

    def madvise(self, addr: int, length: int, advice: int) -> int:
        """``madvise``: guest_memfd's rules inside its mappings (MADV_REMOVE punches, MADV_COLLAPSE EINVAL);
        elsewhere the mmu notifier for discarding advice, then -2 (the real call)."""
        mapping = self.memory.mapping_containing(addr)
        if mapping is not None:
            if mapping.alias and advice not in (MADV_REMOVE, MADV_COLLAPSE):
                return NOT_MINE  # plain advice acts on the program's own range
            mapping.owner.madvise(advice, addr - mapping.address, length)
            return 0
        if advice in DISCARDING_ADVICE:
            self.memory.invalidate(addr, length, unmap=False)
        return NOT_MINE

    def shutdown(self) -> None:
        """At exit: write the trace."""
        self.write_trace()

    def close_all(self) -> None:
        """Close every fd the program left open, the guest_memfd mappings it left mapped, and the sim (as the
        kernel does at process exit; tests use it to end a server)."""
        for fd in self.table.fds():
            try:
                self.table.close(fd)
            except OSError:
                pass
        for mapping in self.memory.drain():
            if mapping.alias:
                _munmap(mapping.address, mapping.size)
            mapping.release()
        self.write_trace()
        self.system.close()

    def _file(self, fd: int, op: str) -> KvmFile:
        return self.table.get(fd, op)


def _stat_struct(file: KvmFile, fd: int) -> bytes:
    """The 144-byte x86-64 ``struct stat`` the kernel would report for ``file``."""
    if file.kind is FileKind.GMEM:
        st = file.obj.gmem.stat()
        fields = (st.st_dev, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, 0, st.st_size, 4096,
                  st.st_blocks)  # fmt: skip
    else:
        st = os.fstat(fd)
        mode, rdev = 0o600, 0  # anon inode (kvm-vm, kvm-vcpu)
        if file.kind is FileKind.SYSTEM:
            mode, rdev = stat.S_IFCHR | 0o666, os.makedev(10, 232)
            try:
                real = os.stat("/dev/kvm")
                mode, rdev = real.st_mode, real.st_rdev
            except OSError:
                pass
        fields = (st.st_dev, st.st_ino, 1, mode, st.st_uid, st.st_gid, rdev, 0, 4096, 0)
    dev, ino, nlink, mode, uid, gid, rdev, size, blksize, blocks = fields
    out = bytearray(144)
    for offset, value, width in (
        (0, dev, 8), (8, ino, 8), (16, nlink, 8), (24, mode, 4), (28, uid, 4), (32, gid, 4), (40, rdev, 8),
        (48, size, 8), (56, blksize, 8), (64, blocks, 8),
    ):  # fmt: skip
        out[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


# --- the module-level contract (SHIM-INTERFACE.md) ---------------------------------------------------------

_server: Server | None = None
_start_lock = threading.Lock()


def start() -> None:
    """Open the sim once: profile from KVMGMEM_RUN_PROFILE (default 6.18), trace to KVMGMEM_RUN_TRACE."""
    global _server
    with _start_lock:
        if _server is None:
            profile = os.environ.get("KVMGMEM_RUN_PROFILE") or "6.18"
            _server = Server(profile, os.environ.get("KVMGMEM_RUN_TRACE") or None)
            atexit.register(_server.shutdown)


def stop() -> None:
    """At the program's exit (the preload library's atexit): write the trace."""
    if _server is not None:
        _server.shutdown()


def _srv() -> Server:
    if _server is None:
        start()
    assert _server is not None
    return _server


def open_path(path: bytes, flags: int, mode: int) -> int:
    """See ``Server.open_path``."""
    return _srv().open_path(path, flags, mode)


def ioctl(fd: int, request: int, arg: int) -> int:
    """See ``Server.ioctl``."""
    return _srv().ioctl(fd, request, arg)


def close(fd: int) -> int:
    """See ``Server.close``."""
    return _srv().close(fd)


def dup(oldfd: int, newfd: int) -> None:
    """See ``Server.dup``."""
    _srv().dup(oldfd, newfd)


def read(fd: int, buf: int, count: int) -> int:
    """See ``Server.read``."""
    return _srv().read(fd, buf, count)


def write(fd: int, buf: int, count: int) -> int:
    """See ``Server.write``."""
    return _srv().write(fd, buf, count)


def pread(fd: int, buf: int, count: int, offset: int) -> int:
    """See ``Server.pread``."""
    return _srv().pread(fd, buf, count, offset)


def pwrite(fd: int, buf: int, count: int, offset: int) -> int:
    """See ``Server.pwrite``."""
    return _srv().pwrite(fd, buf, count, offset)


def lseek(fd: int, offset: int, whence: int) -> int:
    """See ``Server.lseek``."""
    return _srv().lseek(fd, offset, whence)


def ftruncate(fd: int, length: int) -> int:
    """See ``Server.ftruncate``."""
    return _srv().ftruncate(fd, length)


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """See ``Server.fallocate``."""
    return _srv().fallocate(fd, mode, offset, length)


def fstat(fd: int, statbuf: int) -> int:
    """See ``Server.fstat``."""
    return _srv().fstat(fd, statbuf)


def mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    """See ``Server.mmap``."""
    return _srv().mmap(addr, length, prot, flags, fd, offset)


def munmap(addr: int, length: int) -> int:
    """See ``Server.munmap``."""
    return _srv().munmap(addr, length)


def madvise(addr: int, length: int, advice: int) -> int:
    """See ``Server.madvise``."""
    return _srv().madvise(addr, length, advice)


__all__ = [
    "GmemState",
    "Server",
    "close",
    "dup",
    "fallocate",
    "fstat",
    "ftruncate",
    "ioctl",
    "lseek",
    "madvise",
    "mmap",
    "munmap",
    "open_path",
    "pread",
    "pwrite",
    "read",
    "start",
    "stop",
    "write",
]
