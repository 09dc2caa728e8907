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
from typing import Any

from kvmgmem import uapi
from kvmgmem.gmem_mapping import GmemMapping

from .user import mapped_range


class MemoryMap:
    """The guest_memfd mappings the server made for the program (by address), and the VMs to notify."""

    def __init__(self, vms: Callable[[], Iterable[Any]]) -> None:
        self._lock = threading.Lock()
        self._mappings: dict[int, GmemMapping] = {}
        self._vms = vms

    def add(self, mapping: GmemMapping) -> None:
        """Record a guest_memfd mapping handed to the program (``server.mmap``)."""
        with self._lock:
            self._mappings[mapping.address] = mapping

    def mapping_at(self, address: int) -> GmemMapping | None:
        """The server's guest_memfd mapping that starts at ``address``."""
        with self._lock:
            return self._mappings.get(address)

    def mapping_containing(self, address: int) -> GmemMapping | None:
        """The server's guest_memfd mapping whose range contains ``address``."""
        with self._lock:
            for mapping in self._mappings.values():
                if mapping.address <= address < mapping.address + mapping.size:
                    return mapping
        return None

    def pop(self, address: int) -> GmemMapping | None:
        """Forget the mapping at ``address`` (the program unmapped it)."""
        with self._lock:
            return self._mappings.pop(address, None)

    def drain(self) -> list[GmemMapping]:
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
            # Only a slot starting at the mapping's start can be proven by the mapping itself (the API takes
            # the mapping's address as userspace_addr); elsewhere hva accesses fail as on unmapped memory.
            if mapping.address == address and size <= mapping.size and not mapping.closed:
                return mapping
            return address
        writable = not flags & uapi.KVM_MEM_READONLY
        if address % uapi.PAGE_SIZE or not mapped_range(address, address + size, writable):
            return address
        return (ctypes.c_char * size).from_address(address)

    def invalidate(self, start: int, length: int, unmap: bool) -> None:
        """The mmu notifier for ``[start, start+length)`` in every VM whose memslots may use it."""
        end = start + length
        for vm in self._vms():
            hook = getattr(vm, "mmu_notifier_invalidate", None)
            if hook is not None and not vm.closed:
                hook(start, end, unmap)
