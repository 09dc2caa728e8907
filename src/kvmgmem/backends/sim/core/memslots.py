"""Memslots: one table per address space, and the REGION/REGION2 argument checks in the kernel's order.

Why here and not in ``vm.py``: the checks of ``check_memory_region_flags`` and ``__kvm_set_memory_region``
depend only on the request, the VM type and the profile, so they are a pure function, testable alone;
``vm.py`` sequences them with the table lookups, the guest_memfd bind (``kvm_gmem_bind``) and the commit
(``kvm_set_memslot``).
"""

from __future__ import annotations

import enum
import errno
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .profile import PG_LEVEL_1G, PG_LEVEL_2M, Profile, level_pages
from .rangemap import RangeMap

if TYPE_CHECKING:
    from .gmem import GmemFile

OP_V1 = "KVM_SET_USER_MEMORY_REGION"
OP_V2 = "KVM_SET_USER_MEMORY_REGION2"

#: Levels at which "mixed attributes" are tracked (``hugepage_has_attrs``).
HUGE_LEVELS = (PG_LEVEL_2M, PG_LEVEL_1G)


class MemslotChange(enum.Enum):
    """What one KVM_SET_USER_MEMORY_REGION(2) does to a memslot (``enum kvm_mr_change``): computed once by
    ``__kvm_set_memory_region``, then ``kvm_set_memslot`` runs the one sequence that kind needs."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


@dataclass(eq=False)
class Memslot:
    """One memslot. ``gmem`` is a plain pointer, not a reference: the file clears it on release
    (``kvm_gmem_release``)."""

    id: int
    as_id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    #: The host address range the adapter can prove is mapped (a pinned HostMemory/buffer), or None.
    hva_live: tuple[int, int] | None = None
    gmem: GmemFile | None = None
    pgoff: int = 0
    gmem_only: bool = False
    invalid: bool = False
    #: kvm_free_memslot ran: any later access is a use-after-free (the checker's KASAN).
    freed: bool = False
    #: Per huge level: region number (gfn // pages-per-level) → True when its attributes are mixed.
    mixed: dict[int, RangeMap[bool]] = field(default_factory=lambda: {lv: RangeMap(False) for lv in HUGE_LEVELS})

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def slot(self) -> int:
        """The u32 ``slot`` field: as_id << 16 | id."""
        return (self.as_id << 16) | self.id

    @property
    def can_be_private(self) -> bool:
        return bool(self.flags & uapi.KVM_MEM_GUEST_MEMFD)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & uapi.KVM_MEM_READONLY)

    @property
    def dirty_logging(self) -> bool:
        return bool(self.flags & uapi.KVM_MEM_LOG_DIRTY_PAGES)

    def hva(self, gfn: int) -> int:
        return self.userspace_addr + (gfn - self.base_gfn) * uapi.PAGE_SIZE

    def hva_ok(self, hva: int, length: int = uapi.PAGE_SIZE) -> bool:
        """Whether ``[hva, hva+length)`` lies in host memory the sim knows is mapped."""
        return self.hva_live is not None and self.hva_live[0] <= hva and hva + length <= self.hva_live[1]

    def gmem_index(self, gfn: int) -> int:
        return self.pgoff + (gfn - self.base_gfn)

    def contains_region(self, base: int, level: int) -> bool:
        return base >= self.base_gfn and base + level_pages(level) <= self.end_gfn

    def __repr__(self) -> str:
        g = f" gmem ino {self.gmem.inode.ino} pgoff {self.pgoff:#x}" if self.gmem else ""
        return (
            f"<Memslot {self.as_id}:{self.id} gfn {self.base_gfn:#x}+{self.npages:#x} flags {self.flags:#x}"
            f" hva {self.userspace_addr:#x}{g}{' INVALID' if self.invalid else ''}>"
        )


class AddressSpace:
    """The memslots of one address space, kept sorted by base gfn (they never overlap)."""

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        self.by_id: dict[int, Memslot] = {}
        self._bases: list[int] = []
        self._sorted: list[Memslot] = []
        self._last: Memslot | None = None  # the last slot ``lookup`` found: faults come in runs on one slot

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self) -> Iterator[Memslot]:
        return iter(list(self._sorted))

    def get(self, slot_id: int) -> Memslot | None:
        return self.by_id.get(slot_id)

    def lookup(self, gfn: int) -> Memslot | None:
        """The memslot containing ``gfn``."""
        s = self._last
        if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
            return s
        i = bisect_right(self._bases, gfn) - 1
        if i >= 0:
            s = self._sorted[i]
            if gfn < s.end_gfn:
                self._last = s
                return s
        return None

    def overlapping(self, start: int, end: int, exclude: Memslot | None = None) -> list[Memslot]:
        """Memslots intersecting ``[start, end)``."""
        out = []
        i = max(bisect_right(self._bases, start) - 1, 0)
        while i < len(self._sorted) and self._sorted[i].base_gfn < end:
            s = self._sorted[i]
            if s.end_gfn > start and s is not exclude:
                out.append(s)
            i += 1
        return out

    def install(self, slot: Memslot) -> None:
        self._last = None
        self.by_id[slot.id] = slot
        i = bisect_right(self._bases, slot.base_gfn)
        self._bases.insert(i, slot.base_gfn)
        self._sorted.insert(i, slot)

    def remove(self, slot: Memslot) -> None:
        self._last = None
        del self.by_id[slot.id]
        i = self._sorted.index(slot)
        del self._sorted[i]
        del self._bases[i]


def check_region(
    profile: Profile,
    has_private_mem: bool,
    nr_address_spaces: int,
    v2: bool,
    slot: int,
    flags: int,
    guest_phys_addr: int,
    memory_size: int,
    userspace_addr: int,
    guest_memfd_offset: int,
) -> None:
    """``kvm_vm_ioctl_set_memory_region``'s v1-flags and slot-id checks, then those of ``check_memory_region_flags``
    and ``__kvm_set_memory_region``, in order. All arguments are the raw u32/u64
    field values."""
    op = OP_V2 if v2 else OP_V1
    # 2. v1 accepts only LOG_DIRTY_PAGES | READONLY.
    if not v2 and flags & ~uapi.KVM_SET_USER_MEMORY_REGION_V1_FLAGS:
        raise KvmError(errno.EINVAL, op, f"flags {flags:#x} not valid for the v1 ioctl")
    # 3. (u16)slot must be a user slot.
    if slot & 0xFFFF >= profile.nr_memslots:
        raise KvmError(errno.EINVAL, op, f"slot id {slot & 0xFFFF} >= {profile.nr_memslots}")
    # A. check_memory_region_flags
    gmem = bool(flags & uapi.KVM_MEM_GUEST_MEMFD)
    valid = uapi.KVM_MEM_LOG_DIRTY_PAGES
    if profile.gmem_slots_all_vm_types or has_private_mem:
        valid |= uapi.KVM_MEM_GUEST_MEMFD
    if gmem:
        valid &= ~uapi.KVM_MEM_LOG_DIRTY_PAGES
    if not (gmem and profile.reject_readonly_gmem):
        valid |= uapi.KVM_MEM_READONLY
    if flags & ~valid:
        raise KvmError(errno.EINVAL, op, f"flags {flags:#x} not valid (valid {valid:#x})")
    # B. size page aligned
    if memory_size % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, op, f"memory_size {memory_size:#x} not page aligned")
    # C. gpa page aligned
    if guest_phys_addr % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, op, f"guest_phys_addr {guest_phys_addr:#x} not page aligned")
    # D. userspace_addr page aligned and a valid user range
    if userspace_addr % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, op, f"userspace_addr {userspace_addr:#x} not page aligned")
    if userspace_addr + memory_size > profile.user_addr_limit:
        raise KvmError(errno.EINVAL, op, "userspace_addr range is not a valid user range")
    # E. guest_memfd offset aligned and offset + size does not wrap (u64)
    if gmem and (guest_memfd_offset % uapi.PAGE_SIZE or guest_memfd_offset + memory_size > uapi.MASK64):
        raise KvmError(errno.EINVAL, op, f"guest_memfd_offset {guest_memfd_offset:#x} unaligned or wraps")
    # F. address space and slot id
    as_id, slot_id = slot >> 16, slot & 0xFFFF
    if as_id >= nr_address_spaces or slot_id >= uapi.KVM_MEM_SLOTS_NUM:
        raise KvmError(errno.EINVAL, op, f"address space {as_id} >= {nr_address_spaces}")
    # G. gpa + size wraps
    if guest_phys_addr + memory_size > uapi.MASK64:
        raise KvmError(errno.EINVAL, op, "guest_phys_addr + memory_size wraps")
    # H. too many pages
    if memory_size >> uapi.PAGE_SHIFT > uapi.KVM_MEM_MAX_NR_PAGES:
        raise KvmError(errno.EINVAL, op, "memory_size exceeds KVM_MEM_MAX_NR_PAGES")
