"""The program's memory behind its memslots: what ``userspace_addr`` may reach, and the mmu notifier.

Why: a memslot's ``userspace_addr`` is an address of the program's own (same process). The sim's vCPUs
touch host memory directly, so the sim only lets them reach memory it can prove is mapped
(``backends/sim/vm.py`` ``_live_range``). ``userspace_for`` gives the API the object that proves it: the
``GmemMapping`` when the address is the start of a guest_memfd mapping the server made, else a ctypes array
over the range when ``/proc/self/maps`` shows it mapped read/write at the time of the ioctl, else the bare
address (every hva access then fails with EFAULT, as the kernel's does on unmapped memory).

The kernel keeps that proof current with the mmu notifier: ``munmap`` or ``madvise(MADV_DONTNEED)`` of a
range under a memslot runs ``kvm_mmu_notifier_invalidate_range_start``/``_end`` before the pages go.
``MemoryMap.invalidate`` is that notifier; the preload library calls it (through ``server.munmap`` /
``server.madvise``) before the real call.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.gmem_mapping import GmemMapping

from .user import mapped_range

if TYPE_CHECKING:
    from kvmgmem.backends.sim.vm import SimVm


@dataclass(eq=False)
class ProgramMapping:
    """A guest_memfd mapping the program holds: at ``address`` (``size`` bytes), owned by ``owner``.

    ``owner`` is the sim's ``GmemMapping`` (file reference, SIGBUS rules, hwpoison re-pointing). For a
    ``MAP_FIXED`` request the program's range is an *alias* of the owner (``mremap`` with old size 0
    duplicates a shared mapping: the same pages, the same SIGBUS), because a ``GmemMapping`` chooses its own
    address."""

    address: int
    size: int
    owner: GmemMapping

    @property
    def alias(self) -> bool:
        """Whether the program's range is a duplicate of the owner's (MAP_FIXED), not the owner itself."""
        return self.address != self.owner.address

    def release(self) -> None:
        """The program unmapped it: drop the owner (deferred while a memslot still uses it)."""
        if self.owner.pinned_by:
            self.owner.__exit__(None, None, None)
        else:
            self.owner.close()


class MemoryMap:
    """The guest_memfd mappings the server made for the program (by address), and the VMs to notify."""

    def __init__(self, vms: Callable[[], Iterable[SimVm]]) -> None:
        self._lock = threading.Lock()
        self._mappings: dict[int, ProgramMapping] = {}
        self._vms = vms

    def add(self, mapping: ProgramMapping) -> None:
        """Record a guest_memfd mapping handed to the program (``server.mmap``)."""
        with self._lock:
            self._mappings[mapping.address] = mapping

    def mapping_at(self, address: int) -> ProgramMapping | None:
        """The program's guest_memfd mapping that starts at ``address``."""
        with self._lock:
            return self._mappings.get(address)

    def mapping_containing(self, address: int) -> ProgramMapping | None:
        """The program's guest_memfd mapping whose range contains ``address``."""
        with self._lock:
            for mapping in self._mappings.values():
                if mapping.address <= address < mapping.address + mapping.size:
                    return mapping
        return None

    def take_within(self, start: int, end: int) -> list[ProgramMapping]:
        """Forget and return the mappings lying wholly inside ``[start, end)`` (a munmap of that range)."""
        with self._lock:
            inside = [m for m in self._mappings.values() if start <= m.address and m.address + m.size <= end]
            for m in inside:
                del self._mappings[m.address]
        return inside

    def drain(self) -> list[ProgramMapping]:
        """Forget every mapping and return them (process exit)."""
        with self._lock:
            mappings = list(self._mappings.values())
            self._mappings.clear()
        return mappings

    def userspace_for(self, address: int, size: int, flags: int) -> Any:
        """What to pass as ``userspace`` for a memslot over ``[address, address+size)`` (module docstring)."""
        if size == 0:
            return address
        mapping = self.mapping_containing(address)
        if mapping is not None:
            # Only a slot starting at the owner's own start can be proven by the owner (the API takes the
            # mapping's address as userspace_addr); elsewhere (an alias, an offset) hva accesses fail as on
            # unmapped memory, and a guest_memfd slot still reaches the file through the binding.
            owner = mapping.owner
            if not mapping.alias and mapping.address == address and size <= owner.size and not owner.closed:
                return owner
            return address
        writable = not flags & uapi.KVM_MEM_READONLY
        if address % uapi.PAGE_SIZE or not mapped_range(address, address + size, writable):
            return address
        return (ctypes.c_char * size).from_address(address)

    def invalidate(self, start: int, length: int, unmap: bool) -> None:
        """The mmu notifier for ``[start, start+length)`` in every VM whose memslots may use it."""
        end = start + length
        for vm in self._vms():
            if not vm.closed:
                vm.mmu_notifier_invalidate(start, end, unmap)
