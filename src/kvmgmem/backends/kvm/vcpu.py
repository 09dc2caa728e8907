"""A vCPU on real KVM: its fd, its mmapped ``kvm_run``, typed exits and kicks.

``run()`` follows rust-vmm's rule: KVM_RUN failing with EFAULT/EHWPOISON while ``exit_reason`` is
KVM_EXIT_MEMORY_FAULT is an exit (``MemoryFaultExit``), every other failure raises ``KvmError``.
A kick sets ``immediate_exit`` (so a vCPU about to enter returns at once) and sends the kick signal to the
thread inside KVM_RUN (so a running vCPU leaves with EINTR); see :mod:`kvmgmem.backends.kvm.kick`.

Two implementations of ``run()`` give identical results:

* the C extension :mod:`kvmgmem.backends.kvm._run` (``_run.c``), used when it is built (every normal
  install): its ``Runner.run`` is installed as the instance's ``run``, so a KVM_EXIT_IO round trip runs no
  Python bytecode. The Python wrapper alone (run lock, thread id, pending state, ctypes argument conversion,
  building the ``IoExit``) cost about 1.2 µs per exit, 15% of a round trip with the guest at CPL0
  (docs/bench.md). Every other exit and every failure is handed back to :func:`_slow_exit` here.
* pure Python (ctypes + struct), used when the extension is missing or ``KVMGMEM_NO_CEXT=1`` is set in the
  environment when the vCPU is created (tests run both).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

from kvmgmem import uapi
from kvmgmem.api import Pending, Vcpu, awaited_reply
from kvmgmem.errors import KvmError, closed_error
from kvmgmem.exits import (
    Exit,
    HltExit,
    HypercallExit,
    InternalErrorExit,
    IoExit,
    MemoryFaultExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
    make_io_exit,
)

from . import kick
from .sys_calls import ioctl, ioctl_ptr, kvm_run_function

try:
    from . import _run as _cext
except ImportError:  # not built (no C compiler at install time): the pure-Python path runs instead
    _cext = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .vm import KvmVm

#: Set to a non-empty value other than "0" to make new vCPUs use the pure-Python KVM_RUN path.
NO_CEXT_ENV = "KVMGMEM_NO_CEXT"


def cext_available() -> bool:
    """Whether the C extension was built and imports."""
    return _cext is not None


def cext_enabled() -> bool:
    """Whether a vCPU created now runs through the C extension (built, and not disabled by the env var)."""
    return _cext is not None and os.environ.get(NO_CEXT_ENV, "") in ("", "0")


_MEMORY_FAULT_ERRNOS = (errno.EFAULT, uapi.EHWPOISON)
# kvm_run is read with struct at fixed offsets (and copied into the ctypes struct for the rare exits) rather
# than through a ctypes view of the mapping: a view would be a buffer export, and a traceback frame holding
# one would make close() fail with BufferError (and unmapping under a live view would crash).
_EXIT_UNION = uapi.kvm_run.exit.offset
_IMMEDIATE_EXIT = uapi.kvm_run.immediate_exit.offset
_EXIT_REASON = struct.Struct("<I")
_EXIT_REASON_OFFSET = uapi.kvm_run.exit_reason.offset
_IO_LAYOUT = struct.Struct("<BBHIQ")  # struct kvm_run.io: direction, size, port, count, data_offset
assert _IO_LAYOUT.size == ctypes.sizeof(uapi.kvm_run_io)
_REASON_AND_IO = struct.Struct(f"<I{_EXIT_UNION - _EXIT_REASON_OFFSET - 4}xBBHIQ")
_U64 = struct.Struct("<Q")
_HYPERCALL_RET = _EXIT_UNION + uapi.kvm_run_hypercall.ret.offset
_MMIO_DATA = _EXIT_UNION + uapi.kvm_run_mmio.data.offset
_MMIO_LEN = _EXIT_UNION + uapi.kvm_run_mmio.len.offset
_U32 = struct.Struct("<I")
#: Pending by value: the C Runner stores the IN marker as the plain str "io_in" (equal to Pending.IO_IN).
_PENDING: dict[str | None, Pending] = {kind.value: kind for kind in Pending}
_kvm_run = kvm_run_function()
_KVM_RUN = uapi.KVM_RUN
_EXIT_IO = uapi.KVM_EXIT_IO
_IO_CACHE_SIZE = 256
_get_ident = threading.get_ident
_get_errno = ctypes.get_errno


class KvmVcpu(Vcpu):
    def __init__(self, vm: KvmVm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.vcpu_id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Pure-Python path: held for the whole of run(); close() takes it after kicking, so kvm_run is never
        # unmapped under a running vCPU thread. (The C path does the same with a mutex inside the Runner.)
        self._run_lock = threading.Lock()
        self._thread_id: int | None = None
        self._io_cache: dict[tuple[int, int, int, int, bytes], IoExit] = {}
        self._finalizer = weakref.finalize(self, os.close, fd)  # dropped without close(): no fd leak
        self._runner: _cext.Runner | None = None
        if cext_enabled():
            # The Runner maps kvm_run once more for itself (unmapped by close(), or when collected) and holds
            # this vCPU only weakly, so no reference cycle delays closing the fd.
            self._runner = _cext.Runner(fd, mmap_size, IoExit, self, _slow_exit)
            self.__dict__["run"] = self._runner.run  # the instance's run() is the C method itself
        kick.install_handler()

    @property
    def uses_cext(self) -> bool:
        """Whether this vCPU's ``run()`` goes through the C extension."""
        return self._runner is not None

    def kvm_run(self) -> uapi.kvm_run:
        """A snapshot (copy) of the shared ``struct kvm_run``."""
        self._check_open("kvm_run")
        return uapi.kvm_run.from_buffer_copy(self._map)

    # The base Vcpu's pending reply, stored in the Runner on the C path: Runner.run() records an IN exit's
    # ("io_in", equal to Pending.IO_IN) itself, so the IO round trip stays free of Python bytecode, and
    # _slow_exit records the others through this setter. The pure-Python path uses the base class's storage.

    @property
    def _pending(self) -> Pending | None:
        runner = self._runner
        if runner is None:
            return self._pending_reply
        return _PENDING.get(runner.pending)

    @_pending.setter
    def _pending(self, kind: Pending | None) -> None:
        runner = self._runner
        if runner is None:
            self._pending_reply = kind
        else:
            runner.pending = kind

    def _reply_length(self) -> int:
        """Read from ``kvm_run``, the kernel's own record of the exit (the C path keeps no length)."""
        if self._pending == Pending.IO_IN:
            _, size, _, count, _ = _IO_LAYOUT.unpack_from(self._map, _EXIT_UNION)
            return int(size * count)
        return int(_U32.unpack_from(self._map, _MMIO_LEN)[0])

    def _release(self) -> None:
        self.kick()
        runner = self._runner
        if runner is not None:
            runner.close()  # waits for a run() in another thread (just kicked) to return
            self._map.close()
            self._finalizer()
            return
        with self._run_lock:
            self._map.close()
            self._finalizer()

    # --- registers -------------------------------------------------------------------------------------

    def _get_regs(self) -> uapi.kvm_regs:
        regs = uapi.kvm_regs()
        ioctl_ptr(self.fd, uapi.KVM_GET_REGS, regs)
        return regs

    def _set_regs(self, regs: uapi.kvm_regs) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_REGS, regs)

    def _get_sregs(self) -> uapi.kvm_sregs:
        sregs = uapi.kvm_sregs()
        ioctl_ptr(self.fd, uapi.KVM_GET_SREGS, sregs)
        return sregs

    def _set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_SREGS, sregs)

    def _set_cpuid2(self, cpuid: Any) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_CPUID2, cpuid, op="KVM_SET_CPUID2")

    def _pre_fault_memory(self, rng: uapi.kvm_pre_fault_memory) -> None:
        ioctl_ptr(self.fd, uapi.KVM_PRE_FAULT_MEMORY, rng)

    def _get_cpuid2(self, cpuid: Any) -> None:
        ioctl_ptr(self.fd, uapi.KVM_GET_CPUID2, cpuid)

    def _get_mp_state(self) -> uapi.kvm_mp_state:
        state = uapi.kvm_mp_state()
        ioctl_ptr(self.fd, uapi.KVM_GET_MP_STATE, state)
        return state

    def _set_mp_state(self, state: uapi.kvm_mp_state) -> None:
        ioctl_ptr(self.fd, uapi.KVM_SET_MP_STATE, state)

    def _get_tsc_khz(self) -> int:
        return ioctl(self.fd, uapi.KVM_GET_TSC_KHZ, 0)

    # --- running ---------------------------------------------------------------------------------------

    def run(self) -> Exit:
        """With the C extension the instance attribute ``run`` (the Runner's method) shadows this, and calling
        it through the class still takes the C path; otherwise the base ``run()`` over :meth:`_run`."""
        runner = self._runner
        if runner is not None:
            return runner.run()
        return Vcpu.run(self)

    def _run(self) -> Exit:
        """The pure-Python KVM_RUN."""
        op = "KVM_RUN"
        if not self._run_lock.acquire(False):
            self._busy()
        try:
            if self._closed:
                raise closed_error(op, self._kind)
            self._thread_id = _get_ident()
            kvm_run = self._map
            ret = _kvm_run(self.fd, _KVM_RUN, 0)
            if ret < 0:
                return self._failed(_get_errno())
            # The hot path: exit_reason and the io member in one unpack (io is garbage unless reason is IO).
            fields = _REASON_AND_IO.unpack_from(kvm_run, _EXIT_REASON_OFFSET)
            if fields[0] == _EXIT_IO:
                return self._io_exit(fields, kvm_run)
            return self._decode(uapi.kvm_run.from_buffer_copy(kvm_run))
        finally:
            self._thread_id = None
            self._run_lock.release()

    def _io_exit(self, fields: tuple[int, ...], kvm_run: mmap.mmap) -> IoExit:
        """The pure-Python path's IoExit, reused from a small per-vCPU cache when an equal one was built
        before: exits are frozen and compare by value, so handing out the same object again is invisible,
        and a lookup is cheaper than building one (a VMM's ports mostly see the same few values)."""
        _, direction, size, port, count, offset = fields
        data = kvm_run[offset : offset + size * count]
        key = (direction, port, size, count, data)
        cache = self._io_cache
        exit = cache.get(key)
        if exit is None:
            if len(cache) >= _IO_CACHE_SIZE:
                cache.clear()
            exit = cache[key] = make_io_exit(direction, port, size, count, data)
        return exit

    def _busy(self) -> NoReturn:
        self._check_open("KVM_RUN")
        raise KvmError(errno.EBUSY, "KVM_RUN", "this vCPU is already running in another thread")

    def _failed(self, err: int) -> Exit:
        """KVM_RUN returned -1 with ``err``: a memory-fault exit, or KvmError (after clearing a kick)."""
        kvm_run = self._map
        reason = _EXIT_REASON.unpack_from(kvm_run, _EXIT_REASON_OFFSET)[0]
        if err in _MEMORY_FAULT_ERRNOS and reason == uapi.KVM_EXIT_MEMORY_FAULT:
            fault = uapi.kvm_run.from_buffer_copy(kvm_run).exit.memory_fault
            return MemoryFaultExit(flags=fault.flags, gpa=fault.gpa, size=fault.size, errno=err)
        if err == errno.EINTR:
            kvm_run[_IMMEDIATE_EXIT] = 0
        raise KvmError(err, "KVM_RUN")

    def _decode(self, run: uapi.kvm_run) -> Exit:
        reason = run.exit_reason
        if reason == uapi.KVM_EXIT_HLT:
            return HltExit()
        if reason == uapi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            return MmioExit(
                phys_addr=mmio.phys_addr,
                data=bytes(mmio.data)[: mmio.len],
                length=mmio.len,
                is_write=bool(mmio.is_write),
            )
        if reason == uapi.KVM_EXIT_HYPERCALL:
            hc = run.exit.hypercall
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

    def _complete_io(self, data: bytes) -> None:
        offset = _IO_LAYOUT.unpack_from(self._map, _EXIT_UNION)[4]
        self._map[offset : offset + len(data)] = data

    def _complete_mmio(self, data: bytes) -> None:
        self._map[_MMIO_DATA : _MMIO_DATA + len(data)] = data

    def _complete_hypercall(self, ret: int) -> None:
        _U64.pack_into(self._map, _HYPERCALL_RET, ret)

    def kick(self) -> None:
        runner = self._runner
        if runner is not None:
            # The Runner signals the thread only while it is inside KVM_RUN (it cannot leave without the GIL).
            runner.kick(kick.signal_number())
            return
        try:
            self._map[_IMMEDIATE_EXIT] = 1
        except ValueError:  # already unmapped by close()
            return
        thread = self._thread_id
        if thread is not None:
            kick.send(thread)


def _slow_exit(vcpu: KvmVcpu, kind: int, value: int) -> Exit:
    """The C path's decoder for everything but KVM_EXIT_IO, called by ``Runner.run`` (still holding the
    Runner's run lock, so kvm_run stays mapped): the same code the pure-Python path runs."""
    if kind == _cext.EXIT:
        exit = vcpu._decode(uapi.kvm_run.from_buffer_copy(vcpu._map))
        vcpu._pending = awaited_reply(exit)[0]  # the Runner recorded None before calling us
        return exit
    if kind == _cext.ERRNO:
        return vcpu._failed(value)
    if kind == _cext.BUSY:
        vcpu._busy()
    raise closed_error("KVM_RUN", vcpu._kind)
