"""The conversion service: one path for both ways a guest asks to change a page's shared/private state.

Real VMMs (QEMU, libkrun, cloud-hypervisor, alioth, Firecracker) see two entry points: the implicit one, a
``KVM_EXIT_MEMORY_FAULT`` whose PRIVATE flag says what the guest wanted, and the explicit one, the
``KVM_HC_MAP_GPA_RANGE`` hypercall. Both end here, as in QEMU's ``kvm_convert_memory()``: validate, set the attribute
for the whole range with one ``KVM_SET_MEMORY_ATTRIBUTES``, then discard the copy that is no longer used, as the policy
says.
"""

from __future__ import annotations

import enum
import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmgmem import uapi
from kvmgmem.api import GuestMemfd, Vm
from kvmgmem.hostmem import HostMemory

from .trace import Tracer


class DiscardPolicy(enum.StrEnum):
    """What happens to the now-unused copy after a conversion, as each VMM does it."""

    BOTH = "both"  # QEMU, libkrun: to-private drops the shared copy, to-shared punches the gmem
    PUNCH_ONLY = "punch-only"  # cloud-hypervisor: only to-shared punches the gmem
    NONE = "none"  # alioth: keep both copies

    @property
    def discards_shared(self) -> bool:
        return self is DiscardPolicy.BOTH

    @property
    def punches_private(self) -> bool:
        return self is not DiscardPolicy.NONE


class ConversionError(ValueError):
    """A conversion request the VMM refuses (a guest bug): a hypercall gets -KVM_EINVAL back."""


@dataclass
class Region:
    """One guest RAM region: a memslot whose shared side is ``host`` and private side ``gmem``."""

    name: str
    slot: int
    gpa: int
    size: int
    host: HostMemory
    gmem: GuestMemfd
    gmem_offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def overlap(self, gpa: int, size: int) -> tuple[int, int] | None:
        start, end = max(gpa, self.gpa), min(gpa + size, self.end)
        return (start, end - start) if start < end else None


@dataclass
class ConversionStats:
    to_private: int = 0
    to_shared: int = 0
    bytes_to_private: int = 0
    bytes_to_shared: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    punched_bytes: int = 0
    discarded_shared_bytes: int = 0
    refused: int = 0


class ConversionService:
    """Serialises conversions (QEMU does them under the BQL) and keeps statistics."""

    def __init__(self, vm: Vm, regions: Sequence[Region], policy: DiscardPolicy, tracer: Tracer) -> None:
        self.vm = vm
        self.regions = list(regions)
        self.policy = policy
        self.tracer = tracer
        self.stats = ConversionStats()
        self._lock = threading.Lock()

    def _pieces(self, gpa: int, size: int) -> list[tuple[Region, int, int]]:
        pieces = []
        for region in self.regions:
            hit = region.overlap(gpa, size)
            if hit is not None:
                pieces.append((region, hit[0], hit[1]))
        return pieces

    def _validate(self, gpa: int, size: int, private: bool) -> list[tuple[Region, int, int]]:
        if size <= 0 or gpa % uapi.PAGE_SIZE or size % uapi.PAGE_SIZE or gpa + size > 1 << 64:
            raise ConversionError(f"convert: gpa {gpa:#x} size {size:#x} is empty, unaligned or wraps")
        pieces = self._pieces(gpa, size)
        covered = sum(length for _, _, length in pieces)
        if private and covered != size:
            # QEMU tolerates to-shared on unassigned space (PCI holes) but private memory needs RAM.
            raise ConversionError(f"convert: [{gpa:#x}, {gpa + size:#x}) is not all guest RAM")
        return pieces

    def convert(self, gpa: int, size: int, private: bool, *, source: str, vcpu: int | None = None) -> None:
        """Make ``[gpa, gpa+size)`` private or shared, then discard per policy. Raises ConversionError."""
        with self._lock:
            start = self.tracer.now()
            try:
                pieces = self._validate(gpa, size, private)
            except ConversionError:
                self.stats.refused += 1
                raise
            attrs = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
            self.vm.set_memory_attributes(gpa, size, attrs)
            for region, piece_gpa, length in pieces:
                self._discard(region, piece_gpa - region.gpa, length, private, vcpu)
            stats = self.stats
            stats.by_source[source] = stats.by_source.get(source, 0) + 1
            if private:
                stats.to_private += 1
                stats.bytes_to_private += size
            else:
                stats.to_shared += 1
                stats.bytes_to_shared += size
            self.tracer.emit("convert", start=start, vcpu=vcpu, gpa=gpa, size=size, private=private, source=source)

    def _discard(self, region: Region, offset: int, length: int, private: bool, vcpu: int | None) -> None:
        if private and self.policy.discards_shared:
            # Shared anonymous memory is shmem: MADV_REMOVE frees the pages (MADV_DONTNEED would only unmap).
            region.host.madvise(mmap.MADV_REMOVE, offset, length)
            self.stats.discarded_shared_bytes += length
            self.tracer.emit("discard", vcpu=vcpu, gpa=region.gpa + offset, size=length)
        elif not private and self.policy.punches_private:
            region.gmem.punch_hole(region.gmem_offset + offset, length)
            self.stats.punched_bytes += length
            self.tracer.emit("punch", vcpu=vcpu, gpa=region.gpa + offset, size=length)
