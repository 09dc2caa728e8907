"""A vCPU on real KVM: its fd, its mmapped ``kvm_run``, typed exits and kicks.

``run()`` follows rust-vmm's rule: KVM_RUN failing with EFAULT/EHWPOISON while ``exit_reason`` is
KVM_EXIT_MEMORY_FAULT is an exit (``MemoryFaultExit``), every other failure raises ``KvmError``.
A kick sets ``immediate_exit`` (so a vCPU about to enter returns at once) and sends the kick signal to the
thread inside KVM_RUN (so a running vCPU leaves with EINTR); see :mod:`kvmgmem.backends.kvm.kick`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.api import Vcpu, u64
from kvmgmem.errors import KvmError, closed_error
from kvmgmem.exits import (
    Exit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    make_io_exit,
)

from . import kick
from .sys_calls import ioctl_ptr, kvm_run_function

if TYPE_CHECKING:
    from .vm import KvmVm

_MEMORY_FAULT_ERRNOS = (errno.EFAULT, uapi.EHWPOISON)
_EXIT_UNION = uapi.kvm_run.exit.offset
_IO_LAYOUT = struct.Struct("<BBHIQ")  # struct kvm_run.io: direction, size, port, count, data_offset
assert _IO_LAYOUT.size == ctypes.sizeof(uapi.kvm_run_io)
_kvm_run = kvm_run_function()


class KvmVcpu(Vcpu):
    def __init__(self, vm: KvmVm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.vcpu_id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_struct: uapi.kvm_run | None = uapi.kvm_run.from_buffer(self._map)
        self._run_addr = ctypes.addressof(self._run_struct)
        # Held for the whole of run(); close() takes it after kicking, so kvm_run is never unmapped
        # under a running vCPU thread.
        self._run_lock = threading.Lock()
        self._thread_id: int | None = None
        self._pending: str | None = None  # exit awaiting completion: "io_in", "mmio_read", "hypercall"
        kick.install_handler()

    @property
    def kvm_run(self) -> uapi.kvm_run:
        """The shared ``struct kvm_run`` (valid until close)."""
        self._check_open("kvm_run")
        assert self._run_struct is not None
        return self._run_struct

    def _release(self) -> None:
        self.kick()
        with self._run_lock:
            self._run_struct = None
            self._map.close()
            os.close(self.fd)

    # --- registers -------------------------------------------------------------------------------------

    def get_regs(self) -> uapi.kvm_regs:
        self._check_open("KVM_GET_REGS")
        regs = uapi.kvm_regs()
        ioctl_ptr(self.fd, uapi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        self._check_open("KVM_SET_REGS")
        if not isinstance(regs, uapi.kvm_regs):
            raise TypeError(f"KVM_SET_REGS: expected uapi.kvm_regs, not {type(regs).__name__}")
        ioctl_ptr(self.fd, uapi.KVM_SET_REGS, regs)

    def get_sregs(self) -> uapi.kvm_sregs:
        self._check_open("KVM_GET_SREGS")
        sregs = uapi.kvm_sregs()
        ioctl_ptr(self.fd, uapi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        self._check_open("KVM_SET_SREGS")
        if not isinstance(sregs, uapi.kvm_sregs):
            raise TypeError(f"KVM_SET_SREGS: expected uapi.kvm_sregs, not {type(sregs).__name__}")
        ioctl_ptr(self.fd, uapi.KVM_SET_SREGS, sregs)

    def set_cpuid(self, entries: Iterable[uapi.kvm_cpuid_entry2] | None = None) -> None:
        self._check_open("KVM_SET_CPUID2")
        chosen = list(self.vm.system.get_supported_cpuid() if entries is None else entries)
        cpuid = uapi.cpuid2_type(len(chosen))()
        cpuid.nent = len(chosen)
        for i, entry in enumerate(chosen):
            cpuid.entries[i] = entry
        ioctl_ptr(self.fd, uapi.KVM_SET_CPUID2, cpuid, op="KVM_SET_CPUID2")

    # --- running ---------------------------------------------------------------------------------------

    def run(self) -> Exit:
        op = "KVM_RUN"
        if not self._run_lock.acquire(blocking=False):
            self._check_open(op)
            raise KvmError(errno.EBUSY, op, "this vCPU is already running in another thread")
        try:
            run = self._run_struct
            if run is None:
                raise closed_error(op, self._kind)
            self._thread_id = threading.get_ident()
            ret = _kvm_run(self.fd, uapi.KVM_RUN, 0)
            self._thread_id = None
            self._pending = None
            if ret < 0:
                err = ctypes.get_errno()
                if err in _MEMORY_FAULT_ERRNOS and run.exit_reason == uapi.KVM_EXIT_MEMORY_FAULT:
                    fault = run.exit.memory_fault
                    return MemoryFaultExit(flags=fault.flags, gpa=fault.gpa, size=fault.size, errno=err)
                if err == errno.EINTR:
                    run.immediate_exit = 0
                raise KvmError(err, op)
            if run.exit_reason == uapi.KVM_EXIT_IO:  # the hot path: decoded with struct, not ctypes
                direction, size, port, count, offset = _IO_LAYOUT.unpack_from(self._map, _EXIT_UNION)
                if direction == uapi.KVM_EXIT_IO_IN:
                    self._pending = "io_in"
                return make_io_exit(direction, port, size, count, self._map[offset : offset + size * count])
            return self._decode(run)
        finally:
            self._thread_id = None
            self._run_lock.release()

    def _decode(self, run: uapi.kvm_run) -> Exit:
        reason = run.exit_reason
        if reason == uapi.KVM_EXIT_HLT:
            return HltExit()
        if reason == uapi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            if not mmio.is_write:
                self._pending = "mmio_read"
            return MmioExit(
                phys_addr=mmio.phys_addr,
                data=bytes(mmio.data)[: mmio.len],
                length=mmio.len,
                is_write=bool(mmio.is_write),
            )
        if reason == uapi.KVM_EXIT_HYPERCALL:
            hc = run.exit.hypercall
            self._pending = "hypercall"
            return HypercallExit(
                nr=hc.nr, args=tuple(hc.args), longmode=bool(hc.flags & uapi.KVM_EXIT_HYPERCALL_LONG_MODE)
            )
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return ShutdownExit()
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            return InternalErrorExit(suberror=internal.suberror, data=tuple(internal.data[: min(internal.ndata, 16)]))
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            event = run.exit.system_event
            return SystemEventExit(type=event.type, data=tuple(event.data[: min(event.ndata, 16)]))
        return UnknownExit(reason=reason)

    def _expect_pending(self, kind: str, op: str) -> uapi.kvm_run:
        self._check_open(op)
        if self._pending != kind:
            raise KvmError(errno.EINVAL, op, f"no pending {kind.replace('_', ' ')} exit to complete")
        assert self._run_struct is not None
        return self._run_struct

    def complete_io(self, data: bytes) -> None:
        run = self._expect_pending("io_in", "complete_io")
        io = run.exit.io
        length = io.size * io.count
        if len(data) != length:
            raise ValueError(f"complete_io: expected {length} bytes (size {io.size} x count {io.count})")
        ctypes.memmove(self._run_addr + io.data_offset, bytes(data), length)

    def complete_mmio(self, data: bytes) -> None:
        run = self._expect_pending("mmio_read", "complete_mmio")
        mmio = run.exit.mmio
        if len(data) != mmio.len:
            raise ValueError(f"complete_mmio: expected {mmio.len} bytes")
        ctypes.memmove(ctypes.addressof(mmio.data), bytes(data), mmio.len)

    def complete_hypercall(self, ret: int) -> None:
        run = self._expect_pending("hypercall", "complete_hypercall")
        run.exit.hypercall.ret = u64(ret, "ret", "complete_hypercall")

    def kick(self) -> None:
        run = self._run_struct
        if run is None:
            return
        run.immediate_exit = 1
        thread = self._thread_id
        if thread is not None:
            kick.send(thread)
