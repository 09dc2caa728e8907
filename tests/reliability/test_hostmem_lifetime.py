"""HostMemory's lifetime against memslots, on both backends (issue 14).

- A VM dropped without ``close()`` lets go of its memslots' memory when it is garbage-collected.

The autouse leak check (tests/conftest.py) also runs after every test here.
"""

from __future__ import annotations

import gc

import kvmgmem
from kvmgmem import HostMemory

from ._support import P

MiB = 1 << 20

# --- issue 14.4: a VM dropped without close() ------------------------------------------------------------


def test_dropped_vm_releases_its_memslot_pins(system: kvmgmem.System) -> None:
    """Issue 14.4: dropping a VM with memslots (no close()) unpins its host memory once it is collected; on
    kvm the pins used to stay forever and ``close()`` failed with EBUSY naming the dead VM."""
    mem = HostMemory(4 * MiB)
    vm = system.create_vm()
    vm.set_user_memory_region(0, 0, 2 * MiB, mem)
    vm.set_user_memory_region(1, 2 * MiB, 2 * MiB, memoryview(mem)[2 * MiB :])  # a plain buffer too
    assert len(mem.pinned_by) == 1
    del vm
    gc.collect()
    assert mem.pinned_by == []
    mem.close()  # a buffer export of the memoryview slot would make this fail with BufferError
    assert mem.closed


def test_dropped_vm_with_a_live_guest_memfd(system: kvmgmem.System) -> None:
    """A guest_memfd object keeps its VM object (as the kernel's file pins the VM): the pins go with the last
    of them, on both backends, and the guest_memfd keeps working meanwhile."""
    mem = HostMemory(2 * MiB)
    vm = system.create_vm()
    gmem = vm.create_guest_memfd(2 * MiB)
    vm.set_user_memory_region(0, 0, 2 * MiB, mem)
    del vm
    gc.collect()
    gmem.punch_hole(0, P)  # still works: the VM lives on
    assert len(mem.pinned_by) == 1
    del gmem
    gc.collect()
    assert mem.pinned_by == []
    mem.close()
