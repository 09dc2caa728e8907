"""The backend-neutral API: ``System``, ``Vm``, ``Vcpu``, ``GuestMemfd``.

Each class is one kernel object (as in rust-vmm's kvm-ioctls) and each ioctl is a method. The public methods
live here and do everything that is not the ioctl itself, once for every backend: check the object is open,
validate and convert the arguments, build the uapi struct the ioctl carries, and keep the state the kernel
keeps on the caller's side of the ABI (memslot pins, the exit waiting for its reply). Each backend implements
one small ``_``-prefixed method per ioctl that takes that struct (``_set_memory_attributes(attrs)``,
``_create_guest_memfd(args)``, ...): the kvm backend issues the ioctl, the sim unpacks the struct into its
model of the kernel. Marshalling in one place is what keeps the backends from drifting apart (they once
disagreed on the width of ``KVM_CHECK_EXTENSION``'s argument).

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
from collections.abc import Iterator
from typing import Any, Self

from kvmgmem import uapi
from kvmgmem.api_args import MAX_RW_COUNT as MAX_RW_COUNT
from kvmgmem.api_args import as_uint as as_uint
from kvmgmem.api_args import bytes_arg as bytes_arg
from kvmgmem.api_args import count_arg as count_arg
from kvmgmem.api_args import cpuid_entries as cpuid_entries
from kvmgmem.api_args import u32 as u32
from kvmgmem.api_args import u64 as u64
from kvmgmem.api_args import ulong as ulong
from kvmgmem.api_x86 import VcpuX86State, VmX86Setup
from kvmgmem.errors import KvmError, closed_error
from kvmgmem.exits import Exit, HypercallExit, IoExit, MmioExit
from kvmgmem.exits import Pending as Pending
from kvmgmem.hostmem import HostMemory

# --- argument marshalling ----------------------------------------------------------------------------------


def fd_of(obj: Any, name: str, op: str) -> int:
    """Return the raw fd of a ``GuestMemfd``, an int, or ``None`` (→ -1, "no fd")."""
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
        """Pin the memory for the duration of the ioctl ``op`` (before the kernel sees the address)."""
        if self.pinnable:
            self._pending = (-1, id(self))
            self.owner._pin(self._pending, f"{op} in progress")

    def release_pending(self) -> None:
        """Drop the ioctl's pin (the memslot's own pin, if any, has replaced it by now)."""
        if self._pending is not None and self.pinnable:
            self.owner._unpin(self._pending)
        self._pending = None

    def pin(self, key: tuple[int, int], what: str) -> None:
        """Pin the memory for the memslot ``key`` (VM id, slot), described as ``what`` in EBUSY errors."""
        if self.pinnable:
            self.owner._pin(key, what)

    def unpin(self, key: tuple[int, int]) -> None:
        """Drop memslot ``key``'s pin and the buffer export that kept a plain buffer from resizing."""
        if self.pinnable:
            self.owner._unpin(key)
        self._holder = None


def is_pinnable(obj: Any) -> bool:
    """Tell whether ``obj`` is memory that memslots pin (``_pin``/``_unpin``, ``address``, ``size``, ``closed``).

    That is HostMemory, and mappings a backend hands out that have no buffer protocol (the sim's guest_memfd
    mapping).
    """
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
        """Release the object (its fd, or the sim's model object); idempotent, as ``close(2)`` on one fd once is."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _release(self) -> None:  # pragma: no cover - overridden
        pass

    @property
    def closed(self) -> bool:
        """Whether ``close()`` has run; every operation on a closed object raises EBADF naming itself."""
        return self._closed

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise closed_error(op, self._kind)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the four objects --------------------------------------------------------------------------------------
#
# Every public method below documents what it does, the errnos it raises (``KvmError.errno``, in the order
# the kernel checks them) and why, with an example that runs on the sim; ``tests/test_api_docs.py`` runs the
# examples as doctests, so they cannot drift from the code.


class GuestMemfd(Resource, abc.ABC):
    """A guest_memfd file (``KVM_CREATE_GUEST_MEMFD``): the VM's private memory, owned by this object.

    Closing the VM leaves it working: the file holds a reference on the VM (``kvm_gmem_create`` takes it),
    not the other way round. Memslots do not pin it: closing it while bound clears the slots' file pointer
    (``kvm_gmem_release``) and later private accesses exit with ``KVM_EXIT_MEMORY_FAULT``. Offsets and lengths
    are bytes of the file; once ``close()`` has run, every file operation raises ``KvmError(EBADF)`` naming
    itself, as the kernel does for a closed fd (:attr:`fd` and :meth:`allocated_bytes` still answer).

    >>> import kvmgmem
    >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
    ...     with vm.create_guest_memfd(1 << 20, kvmgmem.GUEST_MEMFD_FLAG_MMAP) as gmem:
    ...         (gmem.size, gmem.flags)
    (1048576, 1)
    """

    _kind = "guest_memfd"
    size: int
    flags: int

    @property
    @abc.abstractmethod
    def fd(self) -> int:
        """The file descriptor (the sim hands out a reserved real fd so the number is unique).

        Pass it as ``guest_memfd`` to :meth:`Vm.set_user_memory_region2`, or use the object itself. Errors:
        none — reading it never fails; after ``close()`` it still answers the old number, which the process
        may reuse for another file, so a memslot given it then fails as ``kvm_gmem_bind`` says (EBADF for no
        file, EINVAL for a file that is not a guest_memfd of this VM).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     with vm.create_guest_memfd(1 << 20) as gmem:
        ...         vm.set_user_memory_region2(0, 1 << 32, 1 << 20, mem, kvmgmem.KVM_MEM_GUEST_MEMFD, gmem.fd)
        ...         vm.set_user_memory_region2(0, 1 << 32, 0)
        ...         gmem.fd >= 0
        True
        """

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)``: allocate (``KEEP_SIZE``) or free (``PUNCH_HOLE|KEEP_SIZE``) a page range.

        ``mode`` is the ``FALLOC_FL_*`` bits; ``offset`` and ``length`` are bytes, multiples of 4096. Errors, in
        the order ``vfs_fallocate`` then ``kvm_gmem_fallocate`` check them: EINVAL for a negative
        offset or a length ≤ 0; EOPNOTSUPP for unknown mode bits, for a mode without ``KEEP_SIZE`` or with
        any bit besides ``KEEP_SIZE|PUNCH_HOLE``; EFBIG when ``offset + length`` passes the maximum file
        size; EINVAL for an unaligned offset or length, and for an allocation that reaches past EOF
        (punching past EOF is a no-op, as ``kvm_gmem_punch_hole`` has no bounds check). Works after the VM
        is closed: the file pins the VM.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20) as gmem:
        ...     gmem.fallocate(kvmgmem.FALLOC_FL_KEEP_SIZE, 0, 8192)
        ...     try:
        ...         gmem.fallocate(0, 0, 4096)           # no KEEP_SIZE: guest_memfd is not resizable
        ...     except kvmgmem.KvmError as e:
        ...         e.errno == errno.EOPNOTSUPP, e.op
        (True, 'fallocate')
        """
        op = "fallocate"
        self._check_open(op)
        self._fallocate(u32(mode, "mode", op), u64(offset, "offset", op), u64(length, "length", op))

    @abc.abstractmethod
    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        """Issue ``fallocate(fd, mode, offset, len)`` with the raw register values.

        ``mode`` is the 32 bits of the kernel's ``int``, ``offset`` and ``length`` the 64 bits of its ``loff_t``
        (see ``uapi.signed64``).
        """

    def allocate(self, offset: int, length: int) -> None:
        """Materialise zeroed pages: ``fallocate(KEEP_SIZE)`` (existing pages and their data stay).

        ``offset`` and ``length`` are bytes, multiples of 4096. Errors as :meth:`fallocate`: EINVAL for a
        negative offset, a length ≤ 0, an unaligned offset or length, or a range that passes EOF; EFBIG past
        the maximum file size; EINTR when a signal arrives mid-allocation, ENOMEM when a page cannot be
        allocated (``kvm_gmem_allocate``).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20) as gmem:
        ...     gmem.allocate(0, 8192)
        ...     gmem.allocated_bytes()
        8192
        """
        self.fallocate(uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        """Free pages, zapping guest mappings first: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``.

        ``kvm_gmem_punch_hole`` brackets the change with an MMU invalidation, so no vCPU can keep using a
        freed page; the next access re-materialises a zero page. ``offset`` and ``length`` are bytes,
        multiples of 4096. Errors as :meth:`fallocate`: EINVAL for a negative offset, a length ≤ 0 or an
        unaligned offset or length; EFBIG past the maximum file size. A range past EOF is not an error (it
        frees nothing there).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20) as gmem:
        ...     gmem.allocate(0, 8192)
        ...     gmem.punch_hole(0, 4096)
        ...     gmem.allocated_bytes()
        4096
        """
        self.fallocate(uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE, offset, length)

    def mmap(self, length: int | None = None, offset: int = 0, shared: bool = True) -> Any:
        r"""Map the file into the host (6.18+, ``kvm_gmem_mmap``); ``length`` defaults to the file size.

        ``length`` is bytes (the object is that long; the kernel maps whole pages), ``offset`` a file offset in
        bytes, a multiple of 4096; both may reach past EOF. Returns a ``GmemMapping``. Errors: EINVAL for a length
        of 0 or an unaligned offset (``do_mmap``, before guest_memfd is asked); ENODEV when the file was created
        without ``GUEST_MEMFD_FLAG_MMAP``; EINVAL for ``shared=False`` (``MAP_PRIVATE`` is refused). A host access
        to a page past EOF, or to any page of a file without ``GUEST_MEMFD_FLAG_INIT_SHARED`` (private memory), is
        answered with SIGBUS by ``kvm_gmem_fault_user_mapping``: the host never touches private memory. The mapping
        holds a reference on the file, so closing the fd keeps the memory while it is mapped.

        >>> import kvmgmem
        >>> flags = kvmgmem.GUEST_MEMFD_FLAG_MMAP | kvmgmem.GUEST_MEMFD_FLAG_INIT_SHARED
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20, flags) as gmem:
        ...     with gmem.mmap() as view:
        ...         view[0:2] = b"hi"
        ...         gmem.punch_hole(0, 4096)
        ...         bytes(view[0:2])
        b'\x00\x00'
        """
        op = "mmap"
        self._check_open(op)
        size = self.size if length is None else u64(length, "length", op)
        return self._mmap(size, u64(offset, "offset", op), bool(shared))

    @abc.abstractmethod
    def _mmap(self, length: int, offset: int, shared: bool) -> Any:
        """``mmap(NULL, length, PROT_READ|PROT_WRITE, MAP_SHARED or MAP_PRIVATE, fd, offset)``."""

    def read(self, n: int) -> bytes:
        """``read(2)``: always EINVAL — guest_memfd's file operations have no read (kept to check the errno).

        ``n`` is the byte count (clamped to ``MAX_RW_COUNT`` as the kernel does). Errors: EINVAL from
        ``vfs_read``, for any ``n`` including 0: the file has no ``FMODE_CAN_READ``.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4096) as gmem:
        ...     try:
        ...         gmem.read(1)
        ...     except kvmgmem.KvmError as e:
        ...         e.op
        'read'
        """
        n = count_arg(n, "n", "read")
        self._check_open("read")
        return self._read(n)

    @abc.abstractmethod
    def _read(self, n: int) -> bytes:
        """``read(fd, buf, n)`` with ``n`` already clamped to ``MAX_RW_COUNT``."""

    def write(self, data: bytes) -> int:
        r"""``write(2)``: always EINVAL, as :meth:`read` (TypeError for data that is not bytes-like).

        ``data`` is any bytes-like object. Errors: EINVAL from ``vfs_write`` for any data, even empty: the file
        has no ``FMODE_CAN_WRITE`` (guest memory is written through a mapping or by the guest).

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4096) as gmem:
        ...     try:
        ...         gmem.write(b"\x01")
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno], e.op)
        EINVAL write
        """
        data = bytes_arg(data, "write")
        self._check_open("write")
        return self._write(data)

    @abc.abstractmethod
    def _write(self, data: bytes) -> int:
        """``write(fd, data, len(data))``."""

    def pread(self, n: int, offset: int) -> bytes:
        """``pread(2)``: always fails — guest_memfd files are not positional (``FMODE_PREAD`` unset).

        ``n`` is the byte count (clamped as in :meth:`read`), ``offset`` the file offset in bytes. Errors, in
        ``ksys_pread64``'s order: EINVAL for a negative offset (as a signed 64-bit value); ESPIPE otherwise,
        for any ``n`` and offset.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4096) as gmem:
        ...     for offset in (-1, 0):
        ...         try:
        ...             gmem.pread(1, offset)
        ...         except kvmgmem.KvmError as e:
        ...             print(errno.errorcode[e.errno])
        EINVAL
        ESPIPE
        """
        n = count_arg(n, "n", "pread")
        offset = u64(offset, "offset", "pread")
        self._check_open("pread")
        return self._pread(n, offset)

    @abc.abstractmethod
    def _pread(self, n: int, offset: int) -> bytes:
        """``pread(fd, buf, n, offset)``; ``offset`` is the 64 bits of the kernel's ``loff_t``."""

    def pwrite(self, data: bytes, offset: int) -> int:
        """``pwrite(2)``: always fails — guest_memfd files are not positional (``FMODE_PWRITE`` unset).

        ``data`` is any bytes-like object (TypeError otherwise), ``offset`` the file offset in bytes. Errors,
        in ``ksys_pwrite64``'s order: EINVAL for a negative offset (as a signed 64-bit value); ESPIPE
        otherwise, even for empty data.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4096) as gmem:
        ...     try:
        ...         gmem.pwrite(b"x", 0)
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno], e.op)
        ESPIPE pwrite
        """
        data = bytes_arg(data, "pwrite")
        offset = u64(offset, "offset", "pwrite")
        self._check_open("pwrite")
        return self._pwrite(data, offset)

    @abc.abstractmethod
    def _pwrite(self, data: bytes, offset: int) -> int:
        """``pwrite(fd, data, len(data), offset)``; ``offset`` as in :meth:`_pread`."""

    def truncate(self, length: int) -> None:
        """``ftruncate(2)``: always EINVAL — ``kvm_gmem_setattr`` refuses every size change, even a no-op.

        ``length`` is the new size in bytes. Errors: EINVAL for every length (the file keeps the size it was
        created with).

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(4096) as gmem:
        ...     try:
        ...         gmem.truncate(4096)
        ...     except kvmgmem.KvmError as e:
        ...         e.errno == errno.EINVAL
        True
        """
        length = u64(length, "length", "ftruncate")
        self._check_open("ftruncate")
        self._truncate(length)

    @abc.abstractmethod
    def _truncate(self, length: int) -> None:
        """``ftruncate(fd, length)``; ``length`` is the 64 bits of the kernel's ``loff_t``."""

    def stat(self) -> os.stat_result:
        """``fstat(2)``: ``st_size`` is the creation size, ``st_blksize`` 4096, ``st_ino`` unique per file.

        ``st_blocks`` stays 0 even after allocation (use :meth:`allocated_bytes`). Errors: none beyond EBADF
        once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20) as gmem:
        ...     st = gmem.stat()
        ...     (st.st_size, st.st_blksize)
        (1048576, 4096)
        """
        self._check_open("fstat")
        return self._stat()

    @abc.abstractmethod
    def _stat(self) -> os.stat_result:
        """``fstat(fd)``."""

    def allocated_bytes(self) -> int | None:
        """Bytes of the file backed by pages now (not a kernel API: for accounting), or None if unknowable.

        The sim counts its model's pages. The kvm backend measures the page cache through a temporary mapping
        (``mincore(2)``), so it answers None for a file without ``GUEST_MEMFD_FLAG_MMAP`` and once closed; on
        6.18 pages only preallocated by ``fallocate`` count from their first use. Errors: none (never raises,
        also not once closed).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_guest_memfd(1 << 20) as gmem:
        ...     before = gmem.allocated_bytes()
        ...     gmem.allocate(0, 3 * 4096)
        ...     (before, gmem.allocated_bytes())
        (0, 12288)
        """
        return None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd}"
        return f"<{type(self).__name__} {state} size={self.size:#x} flags={self.flags:#x}>"


class VmSimOptions(abc.ABC):
    """The sim-only options of a VM, declared on the API so a VMM asks rather than probes; None on kvm.

    A mixin ``Vm`` inherits, as it does the x86 set-up ioctls (``api_x86``): each backend implements the
    ``_``-prefixed methods.
    """

    @property
    def private_access_bit(self) -> int | None:
        """The private access bit this VM's vCPUs honour (sim only), or None.

        :attr:`System.private_access_bit` applies to ``KVM_X86_SW_PROTECTED_VM`` VMs only: a DEFAULT VM has
        no private memory to convert to. Always None on real KVM. Errors: none (no ioctl; it answers after
        ``close()`` too).

        >>> import kvmgmem
        >>> from kvmgmem import uapi
        >>> with kvmgmem.open("sim", private_access_bit=51) as kvm:
        ...     with kvm.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as pvm, kvm.create_vm() as dvm:
        ...         pvm.private_access_bit, dvm.private_access_bit
        (51, None)
        """
        return self._private_access_bit()

    @abc.abstractmethod
    def _private_access_bit(self) -> int | None:
        """Return the private access bit this VM's vCPUs honour; None if none (real KVM, not SW_PROTECTED)."""

    def introspect(self) -> dict[str, Any] | None:
        """Return a snapshot of the sim's model of this VM's kernel state, or None on real KVM (it shows none).

        Keys include ``sptes`` (what the MMU maps), ``attributes`` (private ranges), ``memslots``, ``gmem``
        (each guest_memfd's page states and bindings) and ``counters`` (faults, zaps, invalidations). For tests
        and tools that check what the API cannot show; nothing here is a kernel interface. It answers after
        ``close()`` too, showing what the VM's release left (a guest_memfd may still pin the VM). Errors: none.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     snapshot = vm.introspect()
        ...     snapshot is not None and {"sptes", "memslots", "counters"} <= snapshot.keys()
        True
        """
        return self._introspect()

    @abc.abstractmethod
    def _introspect(self) -> dict[str, Any] | None:
        """Return the backend's snapshot of the VM's kernel state; None where the kernel shows none (real KVM)."""


def awaited_reply(exit: Exit) -> tuple[Pending | None, int]:
    """Return the reply ``exit`` waits for, and how many bytes of data it takes.

    IN and MMIO-read exits wait for their data, hypercall exits for a return value, every other exit for
    nothing.
    """
    if isinstance(exit, IoExit):
        return (None, 0) if exit.is_out else (Pending.IO_IN, exit.size * exit.count)
    if isinstance(exit, MmioExit):
        return (None, 0) if exit.is_write else (Pending.MMIO_READ, exit.length)
    if isinstance(exit, HypercallExit):
        return Pending.HYPERCALL, 0
    return None, 0


class Vcpu(Resource, VcpuX86State, abc.ABC):
    """A vCPU (``KVM_CREATE_VCPU``). ``run()`` returns a typed exit; ``kick()`` makes it return soon.

    A vCPU starts in the architectural reset state. ``kvmgmem.guest.GuestVm`` loads a long-mode guest
    image and its boot state (``GuestVm.create_vcpu``); the examples that run a guest build the smallest one
    that way and then use the raw calls. Once ``close()`` has run, every method but :meth:`kick` raises
    ``KvmError(EBADF)`` naming its operation, as the kernel does for a closed fd.
    """

    _kind = "vCPU"
    vm: Vm
    vcpu_id: int

    def get_regs(self) -> uapi.kvm_regs:
        """``KVM_GET_REGS``: the general-purpose registers, RIP and RFLAGS, as a ``uapi.kvm_regs`` copy.

        Errors: EINVAL for a vCPU whose state is protected (SEV-ES, TDX: ``kvm_arch_vcpu_ioctl_get_regs``
        checks ``guest_state_protected``; no such VM type on the sim or this host); otherwise none beyond EBADF
        once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     hex(vcpu.get_regs().rip)                  # the reset vector's offset
        '0xfff0'
        """
        self._check_open("KVM_GET_REGS")
        return self._get_regs()

    @abc.abstractmethod
    def _get_regs(self) -> uapi.kvm_regs:
        """``KVM_GET_REGS`` into a new ``kvm_regs``."""

    def set_regs(self, regs: uapi.kvm_regs) -> None:
        """``KVM_SET_REGS``: load registers (TypeError for anything but a ``uapi.kvm_regs``).

        Any values are accepted (RFLAGS bit 1 is forced on, as ``__set_regs`` does through
        ``kvm_set_rflags``). Errors: EINVAL for a protected-state vCPU, as :meth:`get_regs`; otherwise none
        beyond EBADF once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     regs = vcpu.get_regs()
        ...     regs.rax = 42
        ...     vcpu.set_regs(regs)
        ...     vcpu.get_regs().rax
        42
        """
        op = "KVM_SET_REGS"
        self._check_open(op)
        if not isinstance(regs, uapi.kvm_regs):
            raise TypeError(f"{op}: expected uapi.kvm_regs, not {type(regs).__name__}")
        self._set_regs(regs)

    @abc.abstractmethod
    def _set_regs(self, regs: uapi.kvm_regs) -> None:
        """``KVM_SET_REGS`` from ``regs``."""

    def get_sregs(self) -> uapi.kvm_sregs:
        """``KVM_GET_SREGS``: segment, control and descriptor-table registers (``uapi.kvm_sregs``).

        After creation this is the RESET state: real mode, CS base 0xffff0000 (``kvm_vcpu_reset``). Errors:
        EINVAL for a protected-state vCPU, as :meth:`get_regs`; otherwise none beyond EBADF once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     sregs = vcpu.get_sregs()
        ...     (hex(sregs.cs.base), sregs.cs.selector, sregs.cr0 & 1)    # real mode: CR0.PE clear
        ('0xffff0000', 61440, 0)
        """
        self._check_open("KVM_GET_SREGS")
        return self._get_sregs()

    @abc.abstractmethod
    def _get_sregs(self) -> uapi.kvm_sregs:
        """``KVM_GET_SREGS`` into a new ``kvm_sregs``."""

    def set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """``KVM_SET_SREGS``: load them; the long-mode boot state of a guest image is loaded this way.

        ``sregs`` is a ``uapi.kvm_sregs`` (TypeError otherwise), usually :meth:`get_sregs`'s answer edited.
        Errors: EINVAL for a protected-state vCPU, and on the kvm backend for a state ``kvm_is_valid_sregs``
        refuses (e.g. long mode without PAE); the sim does not check the state (its engine runs loaded
        long-mode state only, see :meth:`run`); EBADF once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     sregs = vcpu.get_sregs()
        ...     sregs.cs.base, sregs.cs.selector = 0x10000, 0x1000
        ...     vcpu.set_sregs(sregs)
        ...     hex(vcpu.get_sregs().cs.base)
        '0x10000'
        """
        op = "KVM_SET_SREGS"
        self._check_open(op)
        if not isinstance(sregs, uapi.kvm_sregs):
            raise TypeError(f"{op}: expected uapi.kvm_sregs, not {type(sregs).__name__}")
        self._set_sregs(sregs)

    @abc.abstractmethod
    def _set_sregs(self, sregs: uapi.kvm_sregs) -> None:
        """``KVM_SET_SREGS`` from ``sregs``."""

    # The exit waiting for its reply. KVM_RUN's caller answers an IN, an MMIO read or a hypercall exit by
    # writing kvm_run before the next KVM_RUN, which completes the instruction with it
    # (``complete_userspace_io``); anything else in between is meaningless. The kernel keeps no such
    # record, so this is the one place that does: ``run()`` sets it from the exit it returns (and clears it
    # first, so a failed run leaves nothing to answer), ``complete_*`` check it. ``_pending`` is a property
    # so that the kvm backend's C runner, which sets it on the hot IO path, can be where it is stored.
    _pending_reply: Pending | None = None
    _pending_length: int = 0  # bytes the pending IN / MMIO read expects

    @property
    def _pending(self) -> Pending | None:
        return self._pending_reply

    @_pending.setter
    def _pending(self, kind: Pending | None) -> None:
        self._pending_reply = kind

    def _reply_length(self) -> int:
        """How many bytes the pending IN or MMIO read expects (a backend may read it from ``kvm_run``)."""
        return self._pending_length

    def run(self) -> Exit:
        r"""``KVM_RUN`` until the next exit, returned as a typed ``kvmgmem.Exit``.

        A failure with EFAULT or EHWPOISON while the exit reason is ``KVM_EXIT_MEMORY_FAULT`` *returns* a
        ``MemoryFaultExit`` (the gpa, size and PRIVATE flag the VMM needs to convert). Errors, raised as
        ``KvmError``: EFAULT for an access through a memslot whose ``userspace_addr`` has nothing mapped
        (``kvm_handle_error_pfn`` prepares no memory-fault exit for it); EINTR when ``immediate_exit`` is set by
        :meth:`kick` or a signal is pending (``kvm_arch_vcpu_ioctl_run`` checks it before anything else, so a
        kicked run never enters the guest); EBADF once closed; any other failure with the kernel's errno. A vCPU
        that is not RUNNABLE with an in-kernel irqchip waits in ``kvm_vcpu_block`` until a kick (EINTR). The sim
        runs loaded long-mode state only: a vCPU still in RESET's real mode exits with ``InternalErrorExit`` when
        its first fetch hits no memslot (as KVM's emulator does) and fails with EINVAL when it hits memory. The GIL
        is released while the guest runs, so other threads (and other vCPUs) go on.

        >>> import kvmgmem
        >>> from kvmgmem.guest import Asm, GuestImage, GuestVm
        >>> from kvmgmem.guest.operands import al
        >>> a = Asm().mov(al, 7).out(0x10, al).hlt()
        >>> with kvmgmem.open("sim") as kvm, GuestVm.create(kvm, GuestImage(a)) as guest:
        ...     vcpu = guest.create_vcpu().vcpu          # a raw Vcpu in the image's long-mode boot state
        ...     vcpu.run()
        ...     vcpu.run()
        IoExit(direction=1, port=16, size=1, count=1, data=b'\x07')
        HltExit()
        """
        self._check_open("KVM_RUN")
        self._pending = None
        exit = self._run()
        self._pending, self._pending_length = awaited_reply(exit)
        return exit

    @abc.abstractmethod
    def _run(self) -> Exit:
        """``KVM_RUN`` once, decoded; the pending reply is recorded by :meth:`run`."""

    def complete_io(self, data: bytes) -> None:
        r"""Answer the pending IN exit: ``data`` is loaded into the guest on the next ``run()``.

        ``data`` is the ``size * count`` bytes the guest reads (little-endian, as the port delivers them); the
        next ``KVM_RUN`` completes the IN with it (``complete_emulated_pio``). Errors: EINVAL (op
        "complete_io") when the last exit was not an IN waiting for data — kvmgmem's own check, since the
        kernel would silently run on; ValueError when ``data`` is not ``size * count`` bytes; TypeError for
        data that is not bytes-like; EBADF once closed.

        >>> import errno, kvmgmem
        >>> from kvmgmem.guest import Asm, GuestImage, GuestVm
        >>> from kvmgmem.guest.operands import al
        >>> a = Asm().in_(al, 0x10).out(0x11, al).hlt()          # echo port 0x10 to port 0x11
        >>> with kvmgmem.open("sim") as kvm, GuestVm.create(kvm, GuestImage(a)) as guest:
        ...     vcpu = guest.create_vcpu().vcpu
        ...     try:
        ...         vcpu.complete_io(b"\x2a")             # nothing is pending before the first run
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        ...     vcpu.run().port                               # the IN
        ...     vcpu.complete_io(b"\x2a")
        ...     vcpu.run().data                               # the OUT echoes it
        EINVAL
        16
        b'*'
        """
        op = "complete_io"
        self._check_open(op)
        data = bytes_arg(data, op)
        self._expect_reply(Pending.IO_IN, op, len(data))
        self._complete_io(data)

    def complete_mmio(self, data: bytes) -> None:
        r"""Answer the pending MMIO read exit: ``data`` is what the guest's load returns on the next ``run()``.

        ``data`` is ``MmioExit.length`` bytes, little-endian. Errors: EINVAL (op "complete_mmio") when the last
        exit was not an MMIO read — kvmgmem's own check, as for :meth:`complete_io`; ValueError when the size
        differs; TypeError for data that is not bytes-like; EBADF once closed.

        >>> import kvmgmem
        >>> from kvmgmem.guest import Asm, GuestImage, GuestVm
        >>> from kvmgmem.guest.operands import al, dword, eax
        >>> a = Asm().mov(eax, dword[0x4000_0000]).out(0x10, al).hlt()    # 1 GiB: no memslot there
        >>> with kvmgmem.open("sim") as kvm, GuestVm.create(kvm, GuestImage(a)) as guest:
        ...     vcpu = guest.create_vcpu().vcpu
        ...     exit = vcpu.run()
        ...     (hex(exit.phys_addr), exit.length, exit.is_write)
        ...     vcpu.complete_mmio((7).to_bytes(4, "little"))
        ...     vcpu.run().value                              # the guest got 7
        ('0x40000000', 4, False)
        7
        """
        op = "complete_mmio"
        self._check_open(op)
        data = bytes_arg(data, op)
        self._expect_reply(Pending.MMIO_READ, op, len(data))
        self._complete_mmio(data)

    def complete_hypercall(self, ret: int) -> None:
        """Answer the pending hypercall exit: ``ret`` goes to RAX and the VMCALL is skipped on the next run.

        ``ret`` is the 64-bit return value (0 for success, a negative errno as two's complement), written to
        ``kvm_run.hypercall.ret`` and loaded by ``complete_hypercall_exit``. Only ``KVM_HC_MAP_GPA_RANGE`` exits,
        and only after ``Vm.enable_cap(KVM_CAP_EXIT_HYPERCALL, ...)``; this host's KVM never returns from the
        guest's VMCALL, so the example is the sim's. Errors: EINVAL (op "complete_hypercall") when the last exit
        was not a ``HypercallExit``; ValueError for a value wider than 64 bits; EBADF once closed.

        >>> import kvmgmem
        >>> from kvmgmem import uapi
        >>> from kvmgmem.guest import Asm, GuestImage, GuestVm
        >>> from kvmgmem.guest.operands import al, rax, rbx, rcx, rdx
        >>> a = Asm().mov(rax, uapi.KVM_HC_MAP_GPA_RANGE).mov(rbx, 1 << 32).mov(rcx, 1).mov(rdx, 0)
        >>> _ = a.vmcall().out(0x10, al).hlt()                # report the low byte of RAX
        >>> with kvmgmem.open("sim") as kvm, GuestVm.create(kvm, GuestImage(a)) as guest:
        ...     guest.vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
        ...     vcpu = guest.create_vcpu().vcpu
        ...     exit = vcpu.run()
        ...     (exit.nr == uapi.KVM_HC_MAP_GPA_RANGE, hex(exit.args[0]), exit.args[1])
        ...     vcpu.complete_hypercall(0)
        ...     vcpu.run().value
        (True, '0x100000000', 1)
        0
        """
        op = "complete_hypercall"
        self._check_open(op)
        value = u64(ret, "ret", op)
        self._expect_reply(Pending.HYPERCALL, op, None)
        self._complete_hypercall(value)

    def _expect_reply(self, kind: Pending, op: str, length: int | None) -> None:
        """EINVAL unless the last exit awaits ``kind``; ValueError when ``length`` is not what it expects."""
        if self._pending != kind:
            raise KvmError(errno.EINVAL, op, f"no pending {kind.description} exit to complete")
        if length is not None:
            expected = self._reply_length()
            if length != expected:
                raise ValueError(f"{op}: expected {expected} bytes, got {length}")

    @abc.abstractmethod
    def _complete_io(self, data: bytes) -> None:
        """Store the IN data (of the right size) where the next ``KVM_RUN`` loads it from."""

    @abc.abstractmethod
    def _complete_mmio(self, data: bytes) -> None:
        """Store the MMIO read data (of the right size) in ``kvm_run.mmio.data``."""

    @abc.abstractmethod
    def _complete_hypercall(self, ret: int) -> None:
        """Store ``ret`` (64 bits) in ``kvm_run.hypercall.ret``."""

    @abc.abstractmethod
    def kick(self) -> None:
        """Make a running (or the next) ``run()`` return with ``KvmError(EINTR)`` (KVM's immediate_exit).

        Safe from any thread or a signal handler's thread; this is how a VMM stops its vCPU threads. One kick
        ends one ``run()``: the one in progress, or else the next, which then returns before entering the
        guest (``kvm_arch_vcpu_ioctl_run`` checks ``immediate_exit`` first). Errors: none — not even once
        closed, where it does nothing (closing a vCPU blocked in ``KVM_RUN`` kicks it itself).

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu() as vcpu:
        ...     vcpu.kick()                                   # no run in progress: the next one returns
        ...     try:
        ...         vcpu.run()
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno], e.op)
        EINTR KVM_RUN
        """


class Vm(Resource, VmX86Setup, VmSimOptions, abc.ABC):
    """A VM (``KVM_CREATE_VM``): memslots, memory attributes, guest_memfds and vCPUs.

    Closing the VM closes its vCPUs; its guest_memfds keep working (they pin the kernel's VM). Guest-physical
    addresses and sizes are bytes; once ``close()`` has run, every method raises ``KvmError(EBADF)`` naming its
    operation, as the kernel does for a closed fd (:attr:`has_private_mem` excepted: it is no ioctl).
    """

    _kind = "VM"
    system: System
    vm_type: int

    def __init__(self) -> None:
        self._slot_users: dict[int, Userspace] = {}
        self._slot_lock = threading.Lock()
        self._vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd: answers may differ by VM type (``kvm_vm_ioctl_check_extension``).

        ``cap`` is a ``uapi.KVM_CAP_*`` number (the ioctl's 64-bit argument). Unknown capabilities answer 0,
        never an error. Errors: none beyond EBADF once closed.

        >>> import kvmgmem
        >>> from kvmgmem import uapi
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)   # MMAP | INIT_SHARED on a DEFAULT VM
        3
        """
        op = "KVM_CHECK_EXTENSION"
        self._check_open(op)
        return self._check_extension(ulong(cap, "cap", op))

    @abc.abstractmethod
    def _check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd with the 64-bit ioctl argument ``cap``."""

    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD``: a new guest_memfd file of ``size`` bytes bound to this VM.

        ``size`` is bytes, a multiple of 4096; ``flags`` the ``GUEST_MEMFD_FLAG_*`` bits. Errors, in
        ``kvm_gmem_create``'s order: EINVAL for flags outside ``KVM_CAP_GUEST_MEMFD_FLAGS`` (on 6.18,
        ``INIT_SHARED`` only for VMs without private memory); EINVAL for a size ≤ 0 (as a signed 64-bit value) or
        not a multiple of 4096. Nothing is allocated until the guest or ``allocate`` touches a page.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     try:
        ...         vm.create_guest_memfd(4097)
        ...     except kvmgmem.KvmError as e:
        ...         (e.errno == errno.EINVAL, e.op)
        (True, 'KVM_CREATE_GUEST_MEMFD')
        """
        op = "KVM_CREATE_GUEST_MEMFD"
        self._check_open(op)
        args = uapi.kvm_create_guest_memfd(size=u64(size, "size", op), flags=u64(flags, "flags", op))
        return self._create_guest_memfd(args)

    @abc.abstractmethod
    def _create_guest_memfd(self, args: uapi.kvm_create_guest_memfd) -> GuestMemfd:
        """``KVM_CREATE_GUEST_MEMFD`` with ``args``: the new file, owned by the returned object."""

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace: Any = None, flags: int = 0
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``; ``memory_size`` 0 deletes the slot.

        ``slot`` carries the address space in its high 16 bits. ``userspace`` is a ``HostMemory``, any
        writable buffer (kept alive and unresizable while the slot exists), an int address or None (0).
        Errors, in ``__kvm_set_memory_region``'s order: EINVAL for flags other than LOG_DIRTY_PAGES|READONLY
        (so ``KVM_MEM_GUEST_MEMFD`` needs :meth:`set_user_memory_region2`), a slot id out of range, an
        unaligned size, gpa or userspace address, an address space the VM does not have, a wrapping range,
        deleting a slot that does not exist, or changing a slot's size or userspace; EEXIST when a new or
        moved slot overlaps another in the same address space.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     vm.set_user_memory_region(0, 0, 1 << 20, mem)
        ...     try:
        ...         vm.set_user_memory_region(1, 0x80000, 1 << 20, mem)   # overlaps slot 0
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno])
        ...     vm.set_user_memory_region(0, 0, 0)                        # delete before the memory goes
        EEXIST
        """
        op = "KVM_SET_USER_MEMORY_REGION"
        self._check_open(op)
        region = uapi.kvm_userspace_memory_region(
            slot=u32(slot, "slot", op),
            flags=u32(flags, "flags", op),
            guest_phys_addr=u64(guest_phys_addr, "guest_phys_addr", op),
            memory_size=u64(memory_size, "memory_size", op),
        )
        with self._memslot_update(userspace, op) as user:
            region.userspace_addr = user.address
            self._set_user_memory_region(region, user)
            self._track_slot(region.slot, region.memory_size, user)

    @abc.abstractmethod
    def _set_user_memory_region(self, region: uapi.kvm_userspace_memory_region, user: Userspace) -> None:
        """Issue ``KVM_SET_USER_MEMORY_REGION`` with ``region``.

        ``user`` is what ``userspace_addr`` came from (pinned for the call; the sim uses it to know which host
        memory its vCPUs may touch).
        """

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
        """``KVM_SET_USER_MEMORY_REGION2``: a memslot that may bind a guest_memfd range (``KVM_MEM_GUEST_MEMFD``).

        ``guest_memfd`` may be a raw int fd so bad fds can be tested. Errors: those of
        :meth:`set_user_memory_region`, then from ``kvm_gmem_bind``: EBADF for a closed or invalid fd;
        EINVAL for a file that is not a guest_memfd of this VM, an unaligned offset, or a range past the
        file's end; a file range already bound gives EINVAL (EEXIST from 7.2). A guest_memfd slot can only
        be deleted, never changed (EINVAL).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     with vm.create_guest_memfd(1 << 20) as gmem:
        ...         vm.set_user_memory_region2(0, 1 << 32, 1 << 20, mem, kvmgmem.KVM_MEM_GUEST_MEMFD, gmem, 0)
        ...         vm.set_user_memory_region2(0, 1 << 32, 0)     # delete: the gmem keeps its pages
        """
        op = "KVM_SET_USER_MEMORY_REGION2"
        self._check_open(op)
        region = uapi.kvm_userspace_memory_region2(
            slot=u32(slot, "slot", op),
            flags=u32(flags, "flags", op),
            guest_phys_addr=u64(guest_phys_addr, "guest_phys_addr", op),
            memory_size=u64(memory_size, "memory_size", op),
            guest_memfd_offset=u64(guest_memfd_offset, "guest_memfd_offset", op),
            guest_memfd=u32(fd_of(guest_memfd, "guest_memfd", op), "guest_memfd", op),
        )
        with self._memslot_update(userspace, op) as user:
            region.userspace_addr = user.address
            self._set_user_memory_region2(region, user)
            self._track_slot(region.slot, region.memory_size, user)

    @abc.abstractmethod
    def _set_user_memory_region2(self, region: uapi.kvm_userspace_memory_region2, user: Userspace) -> None:
        """``KVM_SET_USER_MEMORY_REGION2`` with ``region`` (``user`` as in :meth:`_set_user_memory_region`)."""

    def set_memory_attributes(self, address: int, size: int, attributes: int, flags: int = 0) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES``: set (overwrite, not OR) the attributes of a gpa range.

        ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` makes the range's guest accesses use the guest_memfd; clearing it
        makes them use the slot's userspace memory. No memslot is needed. The change is bracketed by an MMU
        invalidation that zaps the old mappings before the new attributes are visible
        (``kvm_vm_set_mem_attributes``). Errors, in order: ENOTTY where the kernel lacks the ioctl; EINVAL
        for flags ≠ 0, attributes outside ``KVM_CAP_MEMORY_ATTRIBUTES`` of this VM (none on a DEFAULT VM),
        size 0, a wrapping range, or an unaligned address or size.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm(kvmgmem.KVM_X86_SW_PROTECTED_VM) as vm:
        ...     vm.set_memory_attributes(1 << 32, 2 << 20, kvmgmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
        ...     try:
        ...         vm.set_memory_attributes(1 << 32, 4096, kvmgmem.KVM_MEMORY_ATTRIBUTE_PRIVATE, flags=1)
        ...     except kvmgmem.KvmError as e:
        ...         e.op
        'KVM_SET_MEMORY_ATTRIBUTES'
        """
        op = "KVM_SET_MEMORY_ATTRIBUTES"
        self._check_open(op)
        attrs = uapi.kvm_memory_attributes(
            address=u64(address, "address", op),
            size=u64(size, "size", op),
            attributes=u64(attributes, "attributes", op),
            flags=u64(flags, "flags", op),
        )
        self._set_memory_attributes(attrs)

    @abc.abstractmethod
    def _set_memory_attributes(self, attrs: uapi.kvm_memory_attributes) -> None:
        """``KVM_SET_MEMORY_ATTRIBUTES`` with ``attrs``."""

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """``KVM_ENABLE_CAP`` on the VM, with up to four ``args``.

        The one capability modelled is ``KVM_CAP_EXIT_HYPERCALL``: ``args[0]`` is the mask of hypercalls
        that exit to the VMM (only ``1 << KVM_HC_MAP_GPA_RANGE``). Errors: EINVAL for flags ≠ 0 or bits
        outside the supported mask; EINVAL for capabilities that cannot be enabled.

        >>> import kvmgmem
        >>> from kvmgmem import uapi
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     vm.enable_cap(uapi.KVM_CAP_EXIT_HYPERCALL, 1 << uapi.KVM_HC_MAP_GPA_RANGE)
        """
        op = "KVM_ENABLE_CAP"
        self._check_open(op)
        if len(args) > 4:
            raise ValueError(f"{op}: at most 4 args, got {len(args)}")
        enable = uapi.kvm_enable_cap(cap=u32(cap, "cap", op), flags=u32(flags, "flags", op))
        for i, arg in enumerate(args):
            enable.args[i] = u64(arg, f"args[{i}]", op)
        self._enable_cap(enable)

    @abc.abstractmethod
    def _enable_cap(self, cap: uapi.kvm_enable_cap) -> None:
        """``KVM_ENABLE_CAP`` on the VM fd with ``cap``."""

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        """``KVM_CREATE_VCPU``: a vCPU with this id (EEXIST if the id is taken, EINVAL past the limit).

        ``vcpu_id`` is the APIC id the vCPU gets (the ioctl's 64-bit argument). Errors, in
        ``kvm_vm_ioctl_create_vcpu``'s order: EINVAL for an id at or above ``KVM_MAX_VCPU_IDS`` (or the VM's
        ``KVM_CAP_MAX_VCPU_ID``); EINVAL when the VM already has ``KVM_CAP_MAX_VCPUS`` vCPUs; EEXIST for an id
        already in use.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        ...     try:
        ...         vm.create_vcpu(0)
        ...     except kvmgmem.KvmError as e:
        ...         e.errno == errno.EEXIST
        True
        """
        op = "KVM_CREATE_VCPU"
        self._check_open(op)
        return self._create_vcpu(ulong(vcpu_id, "vcpu_id", op))

    @abc.abstractmethod
    def _create_vcpu(self, vcpu_id: int) -> Vcpu:
        """Issue ``KVM_CREATE_VCPU`` with the 64-bit ioctl argument ``vcpu_id``.

        The backend records the vCPU in ``_vcpus`` so that closing the VM closes it.
        """

    @property
    def has_private_mem(self) -> bool:
        """Whether the VM type has private memory (``kvm_arch_has_private_mem``): SW_PROTECTED, SNP, TDX.

        Only such VMs accept ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` and refuse ``GUEST_MEMFD_FLAG_INIT_SHARED`` (on
        6.18). Errors: none — no ioctl is issued, it answers from the VM type, also once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm:
        ...     with kvm.create_vm() as vm, kvm.create_vm(kvmgmem.KVM_X86_SW_PROTECTED_VM) as protected:
        ...         (vm.has_private_mem, protected.has_private_mem)
        (False, True)
        """
        return self.vm_type in uapi.PRIVATE_MEM_VM_TYPES

    # Pin bookkeeping shared by backends: a slot id (with its address space) keeps its host memory alive.

    @contextlib.contextmanager
    def _memslot_update(self, userspace: Any, op: str) -> Iterator[Userspace]:
        """Resolve ``userspace`` pinned for the duration of one memslot ioctl.

        The backend issues the ioctl and calls ``_track_slot`` inside the block.
        """
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
    """An open KVM (``/dev/kvm`` or the sim): capabilities and VM creation. Made by ``kvmgmem.open``.

    ``backend`` is "kvm" or "sim", ``selection_reason`` why ``kvmgmem.open`` chose it. Once ``close()`` has
    run, every method raises ``KvmError(EBADF)`` naming its operation.
    """

    _kind = "KVM system"
    backend: str
    selection_reason: str = ""

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm``: what the KVM can do; unknown capabilities answer 0.

        ``cap`` is a ``uapi.KVM_CAP_*`` number, passed as the ioctl's 64-bit argument
        (``kvm_vm_ioctl_check_extension_generic`` looks at all of it). Errors: none beyond EBADF once closed.

        >>> import kvmgmem
        >>> from kvmgmem import uapi
        >>> with kvmgmem.open("sim") as kvm:
        ...     kvm.check_extension(uapi.KVM_CAP_GUEST_MEMFD), kvm.check_extension(123456)
        (1, 0)
        """
        op = "KVM_CHECK_EXTENSION"
        self._check_open(op)
        return self._check_extension(ulong(cap, "cap", op))

    @abc.abstractmethod
    def _check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm`` with the 64-bit ioctl argument ``cap``."""

    def create_vm(self, vm_type: int = 0) -> Vm:
        """``KVM_CREATE_VM``: a VM of ``vm_type`` (EINVAL unless the type is in ``supported_vm_types``).

        ``vm_type`` is a ``KVM_X86_*_VM`` number (0, the default type, for an ordinary VM). Errors: EINVAL for
        a type ``kvm_is_vm_type_supported`` refuses (``kvm_arch_init_vm``); ENOMEM or EMFILE when the kernel
        or the process runs out; EBADF once closed.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm:
        ...     try:
        ...         kvm.create_vm(7)
        ...     except kvmgmem.KvmError as e:
        ...         (e.errno == errno.EINVAL, e.op)
        (True, 'KVM_CREATE_VM')
        """
        op = "KVM_CREATE_VM"
        self._check_open(op)
        return self._create_vm(ulong(vm_type, "vm_type", op))

    @abc.abstractmethod
    def _create_vm(self, vm_type: int) -> Vm:
        """``KVM_CREATE_VM`` with the 64-bit ioctl argument ``vm_type``."""

    def get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID entries a VMM may give its vCPUs (see :meth:`Vcpu.set_cpuid`).

        Returns copies, so editing them changes nothing until they are passed to ``set_cpuid``. The buffer is
        sized for the kernel's maximum (256 entries), so the ioctl's E2BIG cannot happen. Errors: none beyond
        EBADF once closed.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm:
        ...     any(e.function == 0 for e in kvm.get_supported_cpuid())
        True
        """
        self._check_open("KVM_GET_SUPPORTED_CPUID")
        return [uapi.kvm_cpuid_entry2.from_buffer_copy(entry) for entry in self._get_supported_cpuid()]

    @abc.abstractmethod
    def _get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        """``KVM_GET_SUPPORTED_CPUID``'s entries (the caller gets copies, so a backend may cache them)."""

    @property
    def supported_vm_types(self) -> frozenset[int]:
        """VM types from KVM_CAP_VM_TYPES (0 means only the default type, as the selftests assume).

        Errors: none beyond EBADF once closed (it is a ``KVM_CHECK_EXTENSION``).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm:
        ...     sorted(kvm.supported_vm_types)            # DEFAULT and SW_PROTECTED
        [0, 1]
        """
        mask = self.check_extension(uapi.KVM_CAP_VM_TYPES)
        if not mask:
            return frozenset({uapi.KVM_X86_DEFAULT_VM})
        return frozenset(t for t in range(32) if mask & (1 << t))

    # --- sim-only options: declared here so a VMM asks, not probes; None on kvm --------------------------------

    @property
    def private_access_bit(self) -> int | None:
        """The sim's private access bit (``kvmgmem.open("sim", private_access_bit=N)``), or None.

        Bit N of a guest's leaf PTE marks the access private, like an SEV C-bit, so the guest converts memory
        implicitly (a mismatch is a ``KVM_EXIT_MEMORY_FAULT``). Upstream ``KVM_X86_SW_PROTECTED_VM`` has no
        such bit and no capability reports it, so real KVM always answers None; a VM honours it only if it
        is SW_PROTECTED (see :attr:`Vm.private_access_bit`). Errors: none (no ioctl; it answers after
        ``close()`` too).

        >>> import kvmgmem
        >>> with kvmgmem.open("sim", private_access_bit=51) as kvm, kvmgmem.open("sim") as plain:
        ...     kvm.private_access_bit, plain.private_access_bit
        (51, None)
        """
        return self._private_access_bit()

    @abc.abstractmethod
    def _private_access_bit(self) -> int | None:
        """Return the private access bit this KVM gives SW_PROTECTED VMs; None where there is none (real KVM)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend}{' closed' if self.closed else ''}>"
