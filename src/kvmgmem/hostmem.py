"""Host memory handed to memslots: stable, 2 MiB-aligned addresses that stay mapped while a memslot uses them.

KVM only ever sees a ``userspace_addr``, and reflects whatever is mapped there into the guest
(``Documentation/virt/kvm/api.rst``, KVM_SET_USER_MEMORY_REGION: with KVM_CAP_SYNC_MMU "changes in the backing
of the memory region are automatically reflected into the guest"). So if Python unmaps or moves the memory
behind a memslot, on real KVM the guest silently loses its memory, and the sim, which maps the same bytes into
unicorn, would crash the interpreter. A memslot therefore *pins* its host memory. The rule, for ``HostMemory``:

- ``close()`` ("unmap now") and ``resize()`` (which may move the mapping) are refused with EBUSY, naming the
  memslots, while any memslot uses the memory. While pinned the object also holds a buffer export of itself,
  so even ``mmap.mmap.close(mem)``/``mmap.mmap.resize(mem, n)`` (the C methods, bypassing these overrides)
  fail instead of unmapping. The other inherited ``mmap`` methods (read/write/seek/find/flush/move/madvise)
  change bytes, never the mapping, and stay allowed.
- Leaving a ``with`` block never fails because of a pin and never replaces the exception leaving the block:
  pinned memory is *closed* (``closed`` is True, no new memslot may use it: EFAULT) and its unmap deferred
  until the last memslot lets go — deleted, or its VM closed or garbage-collected — the way a mapping
  outlives the close of the fd it came from. So ``with kvm.create_vm() as vm, HostMemory(n) as mem:`` works
  in either nesting order. (A live ``memoryview`` can still block an unmap, as for any ``mmap``: the deferred
  one is then retried by ``close()``, or happens when the object is collected.)
- Plain buffers are held through a ctypes export, which makes ``mmap.close()``/``bytearray`` resizing fail.

Placement: a HostMemory of 2 MiB or more starts on a 2 MiB boundary. KVM maps a guest page huge only if the
host address and the guest address agree modulo the huge page (``kvm_alloc_memslot_metadata`` disallows large
pages for a slot whose ``userspace_addr`` and ``base_gfn`` are misaligned), and the sim follows the same rule;
the kernel places ``MAP_SHARED`` anonymous memory at any page boundary. Python's ``mmap`` takes no address, so
``_place_aligned`` steers the kernel's own choice into an aligned hole and checks where it landed.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from kvmgmem.errors import KvmError
from kvmgmem.libc import MAP_NORESERVE as _MAP_NORESERVE
from kvmgmem.libc import PROT_NONE as _PROT_NONE
from kvmgmem.libc import PROT_RW as _PROT_RW
from kvmgmem.libc import failed, mincore, mmap_, munmap

#: The x86-64 huge page (PMD) size: HostMemory at least this big starts on a multiple of it.
HUGE_PAGE = 2 << 20
#: Attempts before ``_place_aligned`` accepts an unaligned placement (each failed one plugs the address-space
#: hole the kernel preferred, so the next lands elsewhere; in practice the first attempt lands).
_PLACEMENT_TRIES = 64


def buffer_address(buf: Any) -> int:
    """Address of a writable buffer's first byte (the buffer must stay alive while the address is used)."""
    holder = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


# --- placement -----------------------------------------------------------------------------------------------


class _AlignedHole:
    """An unmapped, 2 MiB-aligned hole of ``size`` bytes that the kernel's next ``size``-byte mapping should take.

    The kernel puts a new mapping at the top of the highest gap that fits it (top-down layout, the default;
    ``vm_unmapped_area``). A ``PROT_NONE`` reservation a little over ``size`` + 2 MiB lands at the top of
    such a gap (its length is kept off a 2 MiB multiple, else the kernel would place it THP-aligned instead,
    ``thp_get_unmapped_area``, leaving room above it). Opening exactly ``size`` bytes at the *highest*
    aligned address inside leaves a placeholder below (the head) and one above that is under 2 MiB (or
    none: the hole then reaches the mapping above), so the hole's top is ``start`` + ``size`` and a
    ``size``-byte mapping placed in it lands at ``start``. ``close()`` unmaps the placeholders; the gap left
    above the memory is under 2 MiB (no later huge mapping is drawn there), the one below merges with the
    free space under it. Placeholders cost address space only (``PROT_NONE``, ``MAP_NORESERVE``).
    """

    def __init__(self, size: int) -> None:
        page = mmap.PAGESIZE
        span = size + HUGE_PAGE + page
        if span % HUGE_PAGE == 0:
            span += page
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        base = mmap_(None, span, _PROT_NONE, flags, -1, 0)
        if failed(base):
            raise KvmError(ctypes.get_errno(), "HostMemory", f"cannot reserve {span} bytes of address space")
        self.start = (base + span - size) // HUGE_PAGE * HUGE_PAGE
        self._fences = [(base, self.start - base), (self.start + size, base + span - self.start - size)]
        munmap(self.start, size)

    def close(self) -> None:
        for start, length in self._fences:
            if length:
                munmap(start, length)
        self._fences = []


_T = TypeVar("_T")
_M = TypeVar("_M", bound=mmap.mmap)


def _place_aligned(size: int, place: Callable[[], _T], address: Callable[[_T], int], drop: Callable[[_T], None]) -> _T:
    """Run ``place`` (which maps ``size`` bytes wherever the kernel chooses) until the mapping starts on 2 MiB.

    ``address`` reads where it landed, ``drop`` unmaps a misplaced one.

    A mapping that lands elsewhere (another thread mapped into the hole first, or a higher gap of between
    ``size`` and ``size`` + 2 MiB existed) is kept until the end as a plug over the place the kernel preferred,
    and the next attempt opens a new hole. Smaller mappings are placed as the kernel likes: they fit in one
    huge page anyway.
    """
    if size < HUGE_PAGE:
        return place()
    plugs: list[_T] = []
    try:
        for _ in range(_PLACEMENT_TRIES):
            hole = _AlignedHole(size)
            try:
                obj = place()
            finally:
                hole.close()
            if address(obj) % HUGE_PAGE == 0:
                return obj
            plugs.append(obj)
        return plugs.pop()  # a pathologically fragmented address space: usable, merely not aligned
    finally:
        for plug in plugs:
            drop(plug)


# --- pinning -------------------------------------------------------------------------------------------------


class Pins:
    """Memslot pins of a piece of host memory: who uses it, and the lock ``close()`` checks them under.

    Shared by ``HostMemory`` and the sim's guest_memfd mapping, so "memory a memslot uses cannot be unmapped"
    is one rule: ``close()`` is refused with EBUSY while pinned, a pin on closed memory fails with EFAULT, and
    ``close_when_unpinned`` (leaving a ``with`` block) defers the unmap to the last ``unpin``.

    ``export``, if given, is called when the first pin arrives and its result kept until the last pin goes: a
    buffer export of the memory, so the C-level ``mmap`` close/resize cannot unmap it behind these checks.
    """

    __slots__ = ("_deferred", "_export", "_held", "_lock", "_pins")

    def __init__(self, export: Callable[[], object] | None = None) -> None:
        self._pins: dict[tuple[int, int], str] = {}
        # Reentrant: a VM dropped without close() unpins from a garbage-collector finalizer, which may run at
        # any allocation — also one made by this thread while it holds the lock (a plain Lock would deadlock).
        self._lock = threading.RLock()
        self._export = export
        self._held: object = None
        self._deferred: Callable[[], None] | None = None

    def pin(self, key: tuple[int, int], what: str, is_closed: Callable[[], bool]) -> None:
        """Pin unless the memory is already unmapped (checked under the lock ``close`` takes: no race).

        A deferred close does not refuse the pin: new users were turned away when their call resolved its
        ``userspace`` (``closed`` is True from the close on), so a pin arriving now belongs to a memslot update
        that was already under way — its slot exists in the kernel and the unmap must wait for it too. Only
        when no memslot is left (a live view blocked the unmap) is there nothing to wait for.
        """
        with self._lock:
            if is_closed():
                raise KvmError(errno.EFAULT, what, "host memory is closed")
            if self._deferred is not None and not self._pins:
                raise KvmError(errno.EFAULT, what, "host memory is closed (its unmap waits for a view)")
            if not self._pins and self._export is not None:
                self._held = self._export()
            self._pins[key] = what

    def unpin(self, key: tuple[int, int]) -> None:
        """Drop one pin; the last one releases the export and runs a deferred unmap."""
        with self._lock:
            if self._pins.pop(key, None) is None or self._pins:
                return
            self._held = None
            if self._deferred is not None:
                try:
                    self._deferred()
                except BufferError:  # the user still holds a view: close() retries, or the object's collection
                    return
                self._deferred = None

    def users(self) -> list[str]:
        """Descriptions of the memslots pinning the memory now."""
        with self._lock:
            return list(self._pins.values())

    @property
    def closing(self) -> bool:
        """Closed by its owner, the unmap still to come (a memslot uses the memory, or a view blocked it)."""
        return self._deferred is not None

    def close_if_unpinned(self, op: str, unmap: Callable[[], None]) -> None:
        """Run ``unmap`` unless a memslot still uses the memory.

        If one does: EBUSY naming the users, or nothing if the unmap is already deferred to the last of them
        (closing twice is not an error).
        """
        with self._lock:
            if self._pins:
                if self._deferred is not None:
                    return
                raise KvmError(errno.EBUSY, op, f"still used by {', '.join(sorted(self._pins.values()))}")
            unmap()
            self._deferred = None

    def run_if_unpinned(self, op: str, action: Callable[[], None]) -> None:
        """Run ``action`` (e.g. a move) unless a memslot uses the memory (EBUSY, naming the users).

        The lock keeps a new pin from arriving while it runs.
        """
        with self._lock:
            if self._pins:
                raise KvmError(errno.EBUSY, op, f"still used by {', '.join(sorted(self._pins.values()))}")
            action()

    def close_when_unpinned(self, unmap: Callable[[], None]) -> bool:
        """Run ``unmap`` now if nothing uses the memory (True), else when the last pin goes (False)."""
        with self._lock:
            if self._pins:
                self._deferred = unmap
                return False
            unmap()  # under the lock, like close(): no pin can arrive between the check and the unmap
            self._deferred = None
            return True


_MMAP_CLOSED: Any = vars(mmap.mmap)["closed"]


def _unmapped(m: mmap.mmap) -> bool:
    """``mmap.mmap``'s own ``closed``: the mapping is gone (HostMemory's ``closed`` also counts a pending close)."""
    return bool(_MMAP_CLOSED.__get__(m, type(m)))


class PinnedMapping(mmap.mmap):
    """An ``mmap.mmap`` that memslots can use as their userspace memory: ``HostMemory`` and ``GmemMapping``.

    One rule for both (see the module docstring): a stable ``address``; ``close()`` is refused (EBUSY) while a
    memslot uses the memory; leaving a ``with`` block never raises because of a pin and never masks the
    block's exception, it defers the unmap to the last memslot instead; while pinned, a buffer export of the
    memory is held, so even ``mmap.mmap.close`` cannot unmap it behind these checks.
    """

    address: int
    _pins: Pins

    def _init_tracking(self) -> None:
        self.address = buffer_address(self)
        me = weakref.ref(self)  # no cycle through the pins: dropped memory is unmapped by refcounting alone

        def export() -> object:  # called by a pin, which runs on a live (referenced) object
            return ctypes.c_char.from_buffer(me())  # type: ignore[arg-type]

        self._pins = Pins(export=export)

    @property  # the contract: ``.size`` is an attribute (mmap's size() method is shadowed)
    def size(self) -> int:  # type: ignore[override]
        """The mapping's length in bytes (``len()``), as an attribute.

        Errors: ValueError once unmapped (``mmap``'s "closed or invalid"), no errno: nothing reaches the
        kernel. ``HostMemory`` and ``GmemMapping`` share this member; the example uses the former.

        >>> import kvmgmem
        >>> with kvmgmem.HostMemory(1 << 20) as mem:
        ...     (mem.size, len(mem), mem.address % 4096)
        (1048576, 1048576, 0)
        """
        return len(self)

    # --- pinning by memslots ---------------------------------------------------------------------------

    def _pin(self, key: tuple[int, int], what: str) -> None:
        self._pins.pin(key, what, lambda: _unmapped(self))

    def _unpin(self, key: tuple[int, int]) -> None:
        self._pins.unpin(key)

    @property
    def pinned_by(self) -> list[str]:
        """Descriptions of the memslots currently using this memory.

        Each names the slot, its address space and VM, as the EBUSY of :meth:`close` does. Errors: none (an
        empty list once nothing uses the memory, also after close). Shared by ``HostMemory`` and
        ``GmemMapping``; shown with the former.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     vm.set_user_memory_region(3, 0, 1 << 20, mem)
        ...     mem.pinned_by
        ...     vm.set_user_memory_region(3, 0, 0)
        ...     mem.pinned_by
        ['memslot 3 (as 0) of <SimVm DEFAULT>']
        []
        """
        return self._pins.users()

    @property
    def closed(self) -> bool:  # type: ignore[override]
        """Closed by its owner: unmapped, or left by a ``with`` block and waiting for its last memslot.

        While it waits, the bytes stay mapped for that memslot; nothing new may use them (a memslot update
        given it fails with EFAULT). Errors: none. Shared by ``HostMemory`` and ``GmemMapping``; shown with
        the former.

        >>> import kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm:
        ...     with kvmgmem.HostMemory(1 << 20) as mem:
        ...         vm.set_user_memory_region(0, 0, 1 << 20, mem)
        ...     (mem.closed, mem.unmapped)            # left the block: closed, still mapped for slot 0
        ...     vm.set_user_memory_region(0, 0, 0)    # the last memslot lets go: unmapped now
        ...     (mem.closed, mem.unmapped)
        (True, False)
        (True, True)
        """
        return self._pins.closing or _unmapped(self)

    @property
    def unmapped(self) -> bool:
        """The bytes are gone (``closed`` is already True while a deferred unmap waits for a memslot).

        Errors: none. Shared by ``HostMemory`` and ``GmemMapping``; shown with the former.

        >>> import kvmgmem
        >>> mem = kvmgmem.HostMemory(4096)
        >>> mem.unmapped, mem.close(), mem.unmapped
        (False, None, True)
        """
        return _unmapped(self)

    def close(self) -> None:
        """Unmap now. Idempotent; refused (EBUSY) while a memslot still uses the memory.

        Errors: ``KvmError(EBUSY)`` (op "HostMemory.close" or "GmemMapping.close") naming the memslots that use
        the memory, which stays mapped and usable; BufferError while a ``memoryview`` of it is alive, as for
        any ``mmap``. Use a ``with`` block to defer the unmap to the last memslot instead. Shared by
        ``HostMemory`` and ``GmemMapping``; shown with the former.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     vm.set_user_memory_region(0, 0, 1 << 20, mem)
        ...     try:
        ...         mem.close()
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno], e.op)
        ...     vm.set_user_memory_region(0, 0, 0)
        ...     mem.close()                           # unused now: unmapped
        EBUSY HostMemory.close
        """
        if not _unmapped(self):  # also retries a deferred unmap that a live view blocked
            self._pins.close_if_unpinned(f"{type(self).__name__}.close", self._unmap)

    def _unmap(self) -> None:
        """Unmap (a subclass may first tell its backend)."""
        mmap.mmap.close(self)

    # ``mmap.mmap`` has a C-level __enter__/__exit__; keep enter, route exit through the deferring close.
    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leave the block: unmap, or defer the unmap to the last memslot still using the memory.

        A failure to unmap (a live ``memoryview``) is raised only if the block itself did not raise: never
        masked.
        """
        if self.closed:
            return
        try:
            self._pins.close_when_unpinned(self._unmap)
        except BufferError:
            if exc_type is None:
                raise


class HostMemory(PinnedMapping):
    """An anonymous ``MAP_SHARED`` read/write mapping with a stable ``address`` (2 MiB-aligned from 2 MiB up).

    It *is* an ``mmap.mmap`` (buffer protocol, slicing, ``madvise``), plus: ``address``, ``size``, and pinning by
    memslots so it cannot be unmapped or moved under a running guest (see the module docstring for the rules).
    """

    def __new__(cls, size: int) -> HostMemory:
        """Map ``size`` bytes (TypeError/ValueError for a size no mmap can have, KvmError when the kernel refuses)."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"HostMemory: size must be an int, not {type(size).__name__}")
        if not 0 < size <= sys.maxsize:
            raise ValueError(f"HostMemory: size must be in 1..{sys.maxsize}, got {size}")

        def place() -> HostMemory:
            try:
                return super(HostMemory, cls).__new__(
                    cls, -1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, prot=_PROT_RW
                )
            except OSError as e:
                raise KvmError(e.errno or errno.ENOMEM, "HostMemory", f"cannot map {size} bytes") from None

        self = _place_aligned(size, place, buffer_address, mmap.mmap.close)
        self._init_tracking()
        return self

    def resize(self, newsize: int) -> None:
        """``mmap.resize``, refused (EBUSY) while a memslot uses the memory, as ``close()`` is.

        Resizing may move the memory, and the slot's ``userspace_addr`` would then point at nothing (or at
        someone else's memory). Unpinned, the mapping may move: ``address`` follows it (and may lose its
        2 MiB alignment). ``newsize`` is bytes (1 up to ``sys.maxsize``). Errors: ``KvmError(EBUSY)`` naming
        the memslots while any uses the memory; ``KvmError`` with ``mremap``'s errno (ENOMEM) when the kernel
        cannot resize, the mapping unchanged; ValueError for a size out of range or closed memory; TypeError
        for a size that is not an int.

        >>> import errno, kvmgmem
        >>> with kvmgmem.open("sim") as kvm, kvm.create_vm() as vm, kvmgmem.HostMemory(1 << 20) as mem:
        ...     mem.resize(2 << 20)
        ...     vm.set_user_memory_region(0, 0, mem.size, mem)
        ...     try:
        ...         mem.resize(4 << 20)
        ...     except kvmgmem.KvmError as e:
        ...         print(errno.errorcode[e.errno], mem.size)
        ...     vm.set_user_memory_region(0, 0, 0)
        EBUSY 2097152
        """
        op = "HostMemory.resize"
        if not isinstance(newsize, int) or isinstance(newsize, bool):
            raise TypeError(f"{op}: newsize must be an int, not {type(newsize).__name__}")
        if not 0 < newsize <= sys.maxsize:
            raise ValueError(f"{op}: newsize must be in 1..{sys.maxsize}, got {newsize}")
        if self.closed:
            raise ValueError(f"{op}: memory is closed")

        def move() -> None:
            try:
                super(HostMemory, self).resize(newsize)
            except OSError as e:  # mremap's errno (ENOMEM): the mapping is unchanged
                raise KvmError(e.errno or errno.ENOMEM, op, f"cannot resize to {newsize} bytes") from None
            self.address = buffer_address(self)

        self._pins.run_if_unpinned(op, move)

    def __repr__(self) -> str:
        name = type(self).__name__
        if _unmapped(self):
            return f"<{name} closed>"
        if self._pins.closing:
            users = self._pins.users()
            waits = f"once {', '.join(sorted(users))} lets go" if users else "once its views are released"
            return f"<{name} closed, unmapped {waits}>"
        return f"<{name} size={len(self)} address=0x{self.address:x}>"


def place_aligned_reservation(cls: type[_M], length: int) -> _M:
    """Make a ``cls`` object owning ``length`` bytes of private, ``MAP_NORESERVE`` address space.

    2 MiB-aligned from 2 MiB up, for a caller that covers it with ``MAP_FIXED`` mappings (a guest_memfd
    mapping: huge guest mappings need the hva and the gpa equally aligned). Never touched before it is
    covered, so it costs no commit charge even at 64 GiB.
    """
    return _place_aligned(
        length,
        lambda: mmap.mmap.__new__(
            cls, -1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, prot=_PROT_RW
        ),
        buffer_address,
        mmap.mmap.close,
    )


_MINCORE_CHUNK = 1 << 30  # bytes per mincore call, to bound the vector we allocate


def resident_bytes(address: int, length: int) -> int:
    """Bytes of ``[address, address+length)`` resident in memory, measured with ``mincore(2)``.

    Used for the accounting of both stores of a RAM region: shared anonymous memory is shmem, so a page
    discarded with MADV_REMOVE really reports non-resident; for a file mapping mincore reports the file's
    page cache, so a guest_memfd mapping shows the file's allocated pages without touching them.
    """
    page = mmap.PAGESIZE
    total = 0
    for start in range(address, address + length, _MINCORE_CHUNK):
        span = min(_MINCORE_CHUNK, address + length - start)
        vec = (ctypes.c_ubyte * ((span + page - 1) // page))()
        if mincore(start, span, vec) != 0:
            raise KvmError(ctypes.get_errno(), "mincore")
        total += sum(v & 1 for v in bytes(vec)) * page
    return total
