"""Per-gfn memory attributes of a VM (KVM_SET_MEMORY_ATTRIBUTES, ``kvm_vm_ioctl_set_mem_attributes``).

Why a range map: the kernel keeps an xarray entry per gfn, but a model that did the same would make
converting 1 TiB cost 2^28 operations. Here an update or query costs O(log n + pieces) and a uniform range
is one run, however large. Absent = 0 = shared, the state of every gfn at VM creation.

This module only stores and validates; the ioctl's zap/store/end ordering lives in ``vm.py`` so that the
invalidation protocol is in one place.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .rangemap import RangeMap

OP = "KVM_SET_MEMORY_ATTRIBUTES"


def validate(address: int, size: int, attributes: int, flags: int, supported: int) -> tuple[int, int]:
    """The flags, attribute-mask, size/wrap and alignment checks of ``kvm_vm_ioctl_set_mem_attributes``, in its order;
    returns the gfn range ``[start, end)``."""
    if flags != 0:
        raise KvmError(errno.EINVAL, OP, f"flags {flags:#x} must be 0")
    if attributes & ~supported:
        raise KvmError(errno.EINVAL, OP, f"attributes {attributes:#x} not in supported mask {supported:#x}")
    if size == 0 or address + size > uapi.MASK64:
        raise KvmError(errno.EINVAL, OP, "size is 0 or address + size wraps")
    if address % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE:
        raise KvmError(errno.EINVAL, OP, "address or size not page aligned")
    return address >> uapi.PAGE_SHIFT, (address + size) >> uapi.PAGE_SHIFT


class AttributeMap:
    """gfn → attribute bits (0 = shared, KVM_MEMORY_ATTRIBUTE_PRIVATE = private)."""

    __slots__ = ("_map", "get")

    def __init__(self) -> None:
        self._map: RangeMap[int] = RangeMap(0)
        #: ``get(gfn)``: the gfn's attribute bits (the map's own method: one call on the fault path, not two).
        self.get: Callable[[int], int] = self._map.get

    def is_private(self, gfn: int) -> bool:
        return bool(self._map.get(gfn) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE)

    def has(self, start: int, end: int, attributes: int) -> bool:
        """Every gfn in ``[start, end)`` has exactly ``attributes`` (the ioctl's no-op test, step 7)."""
        return self._map.is_uniform(start, end, attributes)

    def is_uniform(self, start: int, end: int) -> bool:
        return self._map.is_uniform(start, end)

    def store(self, start: int, end: int, attributes: int) -> None:
        """Overwrite (not OR) the attributes of ``[start, end)`` (step 10)."""
        self._map.set(start, end, attributes)

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        return self._map.pieces(start, end)

    def boundaries(self, start: int, end: int) -> list[int]:
        return self._map.boundaries(start, end)

    def runs(self) -> list[tuple[int, int | None, int]]:
        return self._map.runs()

    def __len__(self) -> int:
        """Runs stored: constant for a uniform range of any size."""
        return len(self._map)
