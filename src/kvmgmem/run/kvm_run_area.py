"""The ``kvm_run`` area of a vCPU fd: a real shared mapping the program maps and the server writes.

Why a memfd: the vCPU's placeholder fd *is* the memfd (``fds.placeholder``), so the program's
``mmap(vcpu_fd, 0)`` maps the same pages the server writes through its own mapping, with the kernel's
layout (``kvm_vcpu_fault``): page 0 ``struct kvm_run``, page ``KVM_PIO_PAGE_OFFSET`` the PIO data page
``kvm_run.io.data_offset`` points into, page ``KVM_COALESCED_MMIO_PAGE_OFFSET`` the (unused) coalesced
MMIO ring. Past the area a touch is SIGBUS, as on the kernel (the memfd ends there).

This module turns typed exits (``kvmgmem.exits``) into the ``kvm_run`` bytes KVM_RUN leaves and reads the
program's replies back (``complete_userspace_io``'s inputs) on the next KVM_RUN.
"""

from __future__ import annotations

import ctypes
import mmap

from kvmgmem import uapi
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
)
from kvmgmem.libc import PROT_RW, c_mmap, munmap

KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2
#: ``KVM_GET_VCPU_MMAP_SIZE`` on x86: the run page, the PIO data page, the coalesced MMIO page.
VCPU_MMAP_SIZE = 3 * uapi.PAGE_SIZE
PIO_DATA_OFFSET = KVM_PIO_PAGE_OFFSET * uapi.PAGE_SIZE


def _put_words(array: ctypes.Array[ctypes.c_uint64], data: tuple[int, ...]) -> int:
    """Copy up to 16 data words (``internal.data`` and ``system_event.data`` both hold 16) into ``array``; return
    how many, the ``ndata`` the kernel reports."""
    words = data[:16]
    for i, word in enumerate(words):
        array[i] = word
    return len(words)


class KvmRunArea:
    """The server's own mapping of one vCPU's ``kvm_run`` memfd, as a ``uapi.kvm_run`` view."""

    def __init__(self, fd: int) -> None:
        self.address = c_mmap(None, VCPU_MMAP_SIZE, PROT_RW, mmap.MAP_SHARED, fd, 0)
        self.run = uapi.kvm_run.from_address(self.address)
        self._pio = (ctypes.c_char * uapi.PAGE_SIZE).from_address(self.address + PIO_DATA_OFFSET)
        self._closed = False

    def close(self) -> None:
        """Unmap the server's view (the program's own mappings are the program's); idempotent."""
        if not self._closed:
            self._closed = True
            munmap(self.address, VCPU_MMAP_SIZE)

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: set by the program to make KVM_RUN return EINTR at once."""
        return bool(self.run.immediate_exit)

    def write_exit(self, exit: Exit) -> None:
        """Fill ``exit_reason`` and the exit union as KVM leaves them for ``exit``."""
        run, union = self.run, self.run.exit
        if isinstance(exit, IoExit):
            run.exit_reason = uapi.KVM_EXIT_IO
            io = union.io
            io.direction, io.size, io.port, io.count = exit.direction, exit.size, exit.port, exit.count
            io.data_offset = PIO_DATA_OFFSET
            if exit.is_out:
                ctypes.memmove(self._pio, exit.data, min(len(exit.data), uapi.PAGE_SIZE))
        elif isinstance(exit, MmioExit):
            run.exit_reason = uapi.KVM_EXIT_MMIO
            mmio = union.mmio
            mmio.phys_addr, mmio.len, mmio.is_write = exit.phys_addr, exit.length, int(exit.is_write)
            data = exit.data.ljust(8, b"\0")[:8] if exit.is_write else bytes(8)
            ctypes.memmove(mmio.data, data, 8)
        elif isinstance(exit, HypercallExit):
            run.exit_reason = uapi.KVM_EXIT_HYPERCALL
            hc = union.hypercall
            hc.nr, hc.ret = exit.nr, 0
            for i in range(6):
                hc.args[i] = exit.args[i] if i < len(exit.args) else 0
            hc.flags = uapi.KVM_EXIT_HYPERCALL_LONG_MODE if exit.longmode else 0
        elif isinstance(exit, MemoryFaultExit):
            self.write_memory_fault(exit.flags, exit.gpa, exit.size)
        elif isinstance(exit, HltExit):
            run.exit_reason = uapi.KVM_EXIT_HLT
        elif isinstance(exit, ShutdownExit):
            run.exit_reason = uapi.KVM_EXIT_SHUTDOWN
        elif isinstance(exit, InternalErrorExit):
            run.exit_reason = uapi.KVM_EXIT_INTERNAL_ERROR
            internal = union.internal
            internal.suberror = exit.suberror
            internal.ndata = _put_words(internal.data, exit.data)
        elif isinstance(exit, SystemEventExit):
            run.exit_reason = uapi.KVM_EXIT_SYSTEM_EVENT
            event = union.system_event
            event.type = exit.type
            event.ndata = _put_words(event.data, exit.data)
        elif isinstance(exit, UnknownExit):
            run.exit_reason = exit.reason
        else:  # pragma: no cover - every Exit subclass is handled above
            raise TypeError(f"no kvm_run encoding for {exit!r}")

    def write_memory_fault(self, flags: int, gpa: int, size: int) -> None:
        """``kvm_prepare_memory_fault_exit``: the exit KVM_RUN leaves when it fails with EFAULT/EHWPOISON."""
        self.run.exit_reason = uapi.KVM_EXIT_MEMORY_FAULT
        fault = self.run.exit.memory_fault
        fault.flags, fault.gpa, fault.size = flags, gpa, size

    def write_intr(self) -> None:
        """``KVM_EXIT_INTR``: KVM_RUN returned EINTR (``immediate_exit``, or a signal)."""
        self.run.exit_reason = uapi.KVM_EXIT_INTR

    def io_in_data(self, length: int) -> bytes:
        """The program's answer to an IN exit: ``length`` (= size * count) bytes of the PIO data page.

        KVM reads its own PIO page (``complete_emulator_pio_in``), not whatever ``data_offset`` now says."""
        return self._pio.raw[:length]

    def mmio_read_data(self, length: int) -> bytes:
        """The program's answer to an MMIO read: the first ``length`` bytes of ``mmio.data``."""
        return bytes(self.run.exit.mmio.data)[:length]

    def hypercall_ret(self) -> int:
        """The program's answer to a hypercall exit: ``hypercall.ret``."""
        return int(self.run.exit.hypercall.ret)
