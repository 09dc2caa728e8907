"""The backend-neutral API: ``System``, ``Vm``, ``Vcpu``, ``GuestMemfd``.

Each class is one kernel object (as in rust-vmm's kvm-ioctls) and each ioctl is a method. Backends subclass
these and implement the abstract ``_``-less methods; everything here is shared: lifetime (context managers,
idempotent ``close()``), argument marshalling (Python ints to the kernel's fixed-width fields) and the small
conveniences built on the raw operations (``allocate``/``punch_hole`` on ``fallocate``).

Argument rule: values are passed to the "kernel" the way a C caller would pass them — a negative int becomes
its two's complement — so the backend returns the kernel's errno for out-of-range values. Only values that
no C caller could express (wrong Python type, more bits than the field has) are refused here, with a
``TypeError``/``ValueError`` naming the operation.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from kvmgmem import uapi
from kvmgmem.errors import KvmError, closed_error
from kvmgmem.exits import Exit
from kvmgmem.hostmem import HostMemory

# --- argument marshalling ----------------------------------------------------------------------------------


def as_uint(value: Any, bits: int, name: str, op: str) -> int:
    """``value`` as the unsigned ``bits``-wide field a C caller would pass (negative → two's complement)."""
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, not bool")
    if not isinstance(value, int):
        try:
            value = value.__index__()
        except AttributeError:
            raise TypeError(f"{op}: {name} must be an int, not {type(value).__name__}") from None
    lo, hi = -(1 << (bits - 1)), (1 << bits) - 1
    if not lo <= value <= hi:
        raise ValueError(f"{op}: {name}={value} does not fit in a {bits}-bit field")
    return value & hi


def u64(value: Any, name: str, op: str) -> int:
    return as_uint(value, 64, name, op)


def u32(value: Any, name: str, op: str) -> int:
    return as_uint(value, 32, name, op)


#: The kernel's MAX_RW_COUNT: a single read/write transfers at most this many bytes (larger counts are clamped).
MAX_RW_COUNT = 0x7FFFF000


def count_arg(value: Any, name: str, op: str) -> int:
    """A byte count passed as C would (size_t; negative → two's complement), clamped to MAX_RW_COUNT as the
    kernel clamps it, so the kernel's own errno comes back for any value."""
    return min(as_uint(value, 64, name, op), MAX_RW_COUNT)


def bytes_arg(data: Any, op: str) -> bytes:
    """Any bytes-like object as bytes, or TypeError naming the operation."""
    try:
        return bytes(memoryview(data))
    except TypeError:
        raise TypeError(f"{op}: data must be a bytes-like object, not {type(data).__name__}") from None


def signed64(value: int) -> int:
    """A u64 field read as the kernel's signed 64-bit ``loff_t``."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def cpuid_entries(entries: Any, op: str = "KVM_SET_CPUID2") -> list[uapi.kvm_cpuid_entry2]:
    """Copies of ``entries``, each a ``uapi.kvm_cpuid_entry2`` (TypeError naming the operation otherwise)."""
    try:
        items = list(entries)
    except TypeError:
        raise TypeError(f"{op}: entries must be an iterable of uapi.kvm_cpuid_entry2") from None
    out = []
    for i, entry in enumerate(items):
        if not isinstance(entry, uapi.kvm_cpuid_entry2):
            raise TypeError(f"{op}: entries[{i}] is a {type(entry).__name__}, not uapi.kvm_cpuid_entry2")
        out.append(uapi.kvm_cpuid_entry2.from_buffer_copy(entry))
    return out


def fd_of(obj: Any, name: str, op: str) -> int:
    """A raw fd from a ``GuestMemfd``, an int, or ``None`` (→ -1, "no fd")."""
    if obj is None:
        return -1
    if isinstance(obj, GuestMemfd):
        return obj.fd if not obj.closed else -1
    if isinstance(obj, bool) or not isinstance(obj, int):
        raise TypeError(f"{op}: {name} must be a GuestMemfd, an int fd or None, not {type(obj).__name__}")
    return obj


class Userspace:
    """A resolved ``userspace`` argument: the address KVM sees, and what keeps it mapped.

    A ``HostMemory`` is pinned *before* the ioctl (the "pending" pin) and stays pinned until the memslot pin
    replaces it, so ``HostMemory.close()`` racing with a memslot update either happens first (the update then
    fails with EFAULT) or is refused (EBUSY) — never in between, with a slot left over unmapped memory.
    """

    __slots__ = ("_holder", "_pending", "address", "owner")

    def __init__(self, address: int, owner: Any = None, holder: Any = None) -> None:
        self.address = address
        self.owner = owner  # HostMemory or the buffer object, None for a raw int
        self._holder = holder  # a ctypes export that blocks resizing/closing a plain buffer
        self._pending: tuple[int, int] | None = None

    @property
    def pinnable(self) -> bool:
        """Owned by memory with memslot pins (HostMemory, the sim's guest_memfd mapping)."""
        return is_pinnable(self.owner)

    def pin_pending(self, op: str) -> None:
        if self.pinnable:
            self._pending = (-1, id(self))
            self.owner._pin(self._pending, f"{op} in progress")

    def release_pending(self) -> None:
        if self._pending is not None and self.pinnable:
            self.owner._unpin(self._pending)
        self._pending = None

    def pin(self, key: tuple[int, int], what: str) -> None:
        if self.pinnable:
            self.owner._pin(key, what)

    def unpin(self, key: tuple[int, int]) -> None:
        if self.pinnable:
            self.owner._unpin(key)
        self._holder = None


def is_pinnable(obj: Any) -> bool:
    """Memory that memslots pin (``_pin``/``_unpin``, ``address``, ``size``, ``closed``): HostMemory, and
    mappings a backend hands out that have no buffer protocol (the sim's guest_memfd mapping)."""
    return isinstance(obj, HostMemory) or (hasattr(obj, "_pin") and hasattr(obj, "_unpin"))


def resolve_userspace(userspace: Any, op: str) -> Userspace:
    """Turn a ``HostMemory``, any writable buffer, an int address or ``None`` (address 0) into a Userspace."""
    import ctypes

    if userspace is None:
        return Userspace(0)
    if is_pinnable(userspace):
        if userspace.closed:
            raise KvmError(errno.EFAULT, op, "userspace memory is closed")
        user = Userspace(userspace.address, userspace)
        user.pin_pending(op)
        return user
    if isinstance(userspace, bool):
        raise TypeError(f"{op}: userspace must be HostMemory, a writable buffer, an int address or None")
    if isinstance(userspace, int):
        return Userspace(u64(userspace, "userspace_addr", op))
    try:
        holder = ctypes.c_char.from_buffer(userspace)
    except TypeError:
        raise TypeError(
            f"{op}: userspace must be HostMemory, a writable buffer, an int address or None, "
            f"not {type(userspace).__name__}"
        ) from None
    except ValueError as e:  # e.g. an empty or closed buffer
        raise ValueError(f"{op}: unusable userspace buffer: {e}") from None
    return Userspace(ctypes.addressof(holder), userspace, holder)


# --- lifetime ----------------------------------------------------------------------------------------------


class Resource:
    """Context manager with an idempotent ``close()``; subclasses release in ``_release()``."""

    _closed: bool = False
    _kind: str = "object"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:  # pragma: no cover - overridden
        pass

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise closed_error(op, self._kind)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the four objects --------------------------------------------------------------------------------------


class GuestMemfd(Resource, abc.ABC):
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``): the VM's private memory, owned by this object.

    Closing the VM leaves it working (it pins the VM, spec §2.14); memslots do not pin it.
    """

    _kind = "guest_memfd"
    size: int
    flags: int

    @property
    @abc.abstractmethod
    def fd(self) -> int:
        """The file descriptor (the sim hands out a reserved real fd so the number is unique)."""

    @abc.abstractmethod
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` with the kernel's checks (spec §2.8)."""

    def allocate(self, offset: int, length: int) -> None:
        """Materialise pages: ``fallocate(KEEP_SIZE)``."""
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free pages, zapping guest mappings first: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``."""
        self.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    @abc.abstractmethod
    def mmap(self, length: int | None = None, offset: int = 0, shared: bool = True) -> Any:
        """Map the file (6.18+, needs GUEST_MEMFD_FLAG_MMAP). ``length`` defaults to the file size."""

    @abc.abstractmethod
    def read(self, n: int) -> bytes:
        """``read(2)``: always fails on a guest_memfd (spec §2.9); kept so tests can check the errno."""

    @abc.abstractmethod
    def write(self, data: bytes) -> int:
        """``write(2)``: always fails (spec §2.9)."""

    @abc.abstractmethod
    def pread(self, n: int, offset: int) -> bytes:
        """``pread(2)``: always fails (spec §2.9)."""

    @abc.abstractmethod
    def pwrite(self, data: bytes, offset: int) -> int:
        """``pwrite(2)``: always fails (spec §2.9)."""

    @abc.abstractmethod
    def truncate(self, length: int) -> None:
        """``ftruncate(2)``: always EINVAL, guest_memfd is not resizable (spec §2.11)."""

    @abc.abstractmethod
    def stat(self) -> os.stat_result:
        """``fstat(2)``."""

    def allocated_bytes(self) -> int | None:
        """Bytes of the file backed by pages now (not a kernel API: for accounting), or None if unknowable."""
        return None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd}"
        return f"<{type(self).__name__} {state} size={self.size:#x} flags={self.flags:#x}>"


class Vcpu(Resource, abc.ABC):
    """A vCPU (``KVM_CREATE_VCPU``). ``run()`` returns a typed exit; ``kick()`` makes it return soon."""

    _kind = "vCPU"
    vm: Vm
    vcpu_id: int

    @abc.abstractmethod
    def get_regs(self) -> uapi.kvm_regs: ...

    @abc.abstractmethod
    def set_regs(self, regs: uapi.kvm_regs) -> None: ...

    @abc.abstractmethod
    def get_sregs(self) -> uapi.kvm_sregs: ...

    @abc.abstractmethod
    def set_sregs(self, sregs: uapi.kvm_sregs) -> None: ...

    @abc.abstractmethod
    def set_cpuid(self, entries: Iterable[uapi.kvm_cpuid_entry2] | None = None) -> None:
        """``KVM_SET_CPUID2``; ``None`` loads the system's supported CPUID (what VMMs do)."""

    @abc.abstractmethod
    def run(self) -> Exit:
        """``KVM_RUN`` until the next exit. A memory fault returns ``MemoryFaultExit``; other failures raise."""

    @abc.abstractmethod
    def complete_io(self, data: bytes) -> None:
        """Answer the pending IN exit: ``data`` is loaded into the guest on the next ``run()``."""

    @abc.abstractmethod
    def complete_mmio(self, data: bytes) -> None:
        """Answer the pending MMIO read exit."""

    @abc.abstractmethod
    def complete_hypercall(self, ret: int) -> None:
        """Answer the pending hypercall exit: ``ret`` goes to RAX and the VMCALL is skipped on the next run."""

    @abc.abstractmethod
    def kick(self) -> None:
        """Make a running (or the next) ``run()`` return with ``KvmError(EINTR)`` (KVM's immediate_exit)."""


class Vm(Resource, abc.ABC):
    """A VM (``KVM_CREATE_VM``): memslots, memory attributes, guest_memfds and vCPUs."""

    _kind = "VM"
    system: System
    vm_type: int

    def __init__(self) -> None:
        self._slot_users: dict[int, Userspace] = {}
        self._slot_lock = threading.Lock()
        self._vcpus: list[Vcpu] = []

    @abc.abstractmethod
    def check_extension(self, cap: int) -> int: ...

    @abc.abstractmethod
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd: ...

    @abc.abstractmethod
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace: Any = None, flags: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``; ``memory_size`` 0 deletes the slot."""

    @abc.abstractmethod
    def set_user_memory_region2(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace: Any = None,
        flags: int = 0,
        guest_memfd: GuestMemfd | int | None = None,
        guest_memfd_offset: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION2``; ``guest_memfd`` may be a raw int fd so bad fds can be tested."""

    @abc.abstractmethod
    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None: ...

    @abc.abstractmethod
    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None: ...

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu: ...

    @property
    def has_private_mem(self) -> bool:
        return self.vm_type in uapi.PRIVATE_MEM_VM_TYPES

    # Pin bookkeeping shared by backends: a slot id (with its address space) keeps its host memory alive.

    @contextlib.contextmanager
    def _memslot_update(self, userspace: Any, op: str) -> Iterator[Userspace]:
        """Resolve ``userspace`` pinned for the duration of one memslot ioctl; the backend issues the ioctl
        and calls ``_track_slot`` inside the block."""
        user = resolve_userspace(userspace, op)
        try:
            yield user
        finally:
            user.release_pending()

    def _track_slot(self, slot: int, memory_size: int, userspace: Userspace) -> None:
        with self._slot_lock:
            old = self._slot_users.pop(slot, None)
            if old is not None:
                old.unpin((id(self), slot))
            if memory_size:
                userspace.pin((id(self), slot), f"memslot {slot & 0xFFFF} (as {slot >> 16}) of {self!r}")
                self._slot_users[slot] = userspace

    def _release_slots(self) -> None:
        with self._slot_lock:
            for slot, user in self._slot_users.items():
                user.unpin((id(self), slot))
            self._slot_users.clear()

    def __repr__(self) -> str:
        name = uapi.VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))
        return f"<{type(self).__name__} {name}{' closed' if self.closed else ''}>"


class System(Resource, abc.ABC):
    """An open KVM (``/dev/kvm`` or the sim): capabilities and VM creation."""

    _kind = "KVM system"
    backend: str
    selection_reason: str = ""

    @abc.abstractmethod
    def check_extension(self, cap: int) -> int: ...

    @abc.abstractmethod
    def create_vm(self, vm_type: int = 0) -> Vm: ...

    @abc.abstractmethod
    def get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]: ...

    @property
    def supported_vm_types(self) -> frozenset[int]:
        """VM types from KVM_CAP_VM_TYPES (0 means only the default type, as the selftests assume)."""
        mask = self.check_extension(uapi.KVM_CAP_VM_TYPES)
        if not mask:
            return frozenset({uapi.KVM_X86_DEFAULT_VM})
        return frozenset(t for t in range(32) if mask & (1 << t))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend}{' closed' if self.closed else ''}>"
