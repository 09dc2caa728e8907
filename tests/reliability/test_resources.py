"""Resource safety on both backends: lifetimes (guest_memfd pins the VM, a mapping outlives its fd), host
memory in use cannot be freed, and fd/mapping counts return to baseline — checked by the autouse leak check
of tests/conftest.py after every test here, and explicitly across many create/close cycles."""

from __future__ import annotations

import errno
import gc
import os

import pytest

import kvmgmem
from kvmgmem import HostMemory, KvmError, uapi

from ._support import P

MMAP_SHARED = uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED
GMEM = uapi.KVM_MEM_GUEST_MEMFD


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_vm_pinned_by_its_guest_memfd(system: kvmgmem.System, backend: str) -> None:
    vm = system.create_vm()
    gmem = vm.create_guest_memfd(8 * P)
    core = getattr(vm, "sim", None)
    vm.close()
    gmem.allocate(0, 8 * P)  # the guest_memfd's VM reference (`kvm_gmem_create`): fallocate keeps working
    gmem.punch_hole(0, 4 * P)
    gmem.allocate(0, P)
    assert gmem.stat().st_size == 8 * P
    if core is not None:
        assert not core.destroyed, "the sim destroyed a VM its guest_memfd still pins"
    gmem.close()
    if core is not None:
        assert core.destroyed and core.refs == 0


def test_gmem_mapping_outlives_its_fd(system: kvmgmem.System) -> None:
    vm = system.create_vm()
    if vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & MMAP_SHARED != MMAP_SHARED:
        vm.close()
        pytest.skip("needs GUEST_MEMFD_FLAG_MMAP|INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS)")
    gmem = vm.create_guest_memfd(4 * P, MMAP_SHARED)
    m = gmem.mmap()
    m[0:5] = b"hello"
    m[3 * P : 3 * P + 5] = b"world"
    gmem.close()
    vm.close()
    assert m[0:5] == b"hello" and m[3 * P : 3 * P + 5] == b"world"  # the mapping holds the file (`kvm_gmem_mmap`)
    m[P : P + 3] = b"new"
    assert m[P : P + 3] == b"new"
    m.close()


def test_freeing_host_memory_in_use_is_refused(system: kvmgmem.System) -> None:
    vm, vm2 = system.create_vm(), system.create_vm()
    mem = HostMemory(8 * P)
    vm.set_user_memory_region(0, 0, 4 * P, mem)
    vm2.set_user_memory_region(3, 0, 8 * P, mem)
    for _ in range(2):
        with pytest.raises(KvmError) as info:
            mem.close()
        assert info.value.errno == errno.EBUSY and info.value.op == "HostMemory.close"
    assert not mem.closed and len(mem.pinned_by) == 2
    mem[0:4] = b"live"  # still mapped and usable
    vm.set_user_memory_region(0, 0, 0, mem)  # delete: one user left
    with pytest.raises(KvmError):
        mem.close()
    vm2.close()  # closing the VM unpins its slots
    assert mem.pinned_by == []
    mem.close()
    vm.close()


def test_failed_memslot_calls_do_not_pin(system: kvmgmem.System) -> None:
    with system.create_vm() as vm, HostMemory(4 * P) as other:
        mem = HostMemory(4 * P)
        vm.set_user_memory_region(0, 0, 4 * P, other)
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(1, 0, 4 * P, mem)  # overlaps slot 0
        assert info.value.errno == errno.EEXIST
        with pytest.raises(KvmError):
            vm.set_user_memory_region(2, 1, 4 * P, mem)  # unaligned gpa
        assert mem.pinned_by == []
        mem.close()
        vm.set_user_memory_region(0, 0, 0)


def test_replacing_a_slot_moves_the_pin(system: kvmgmem.System) -> None:
    with system.create_vm() as vm:
        a, b = HostMemory(4 * P), HostMemory(4 * P)
        vm.set_user_memory_region(0, 0, 4 * P, a)
        vm.set_user_memory_region(0, 0, 0)
        vm.set_user_memory_region(0, 0, 4 * P, b)
        a.close()
        with pytest.raises(KvmError):
            b.close()
        vm.set_user_memory_region(0, 0, 0)
        b.close()


CYCLES = 30


def test_create_close_cycles_return_to_baseline(system: kvmgmem.System) -> None:
    """Many full lifecycles; the fd count is back to where it started after each (no slow leak)."""
    base = _fd_count()
    for i in range(CYCLES):
        vm = system.create_vm()
        flags = vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS) & MMAP_SHARED
        gmem = vm.create_guest_memfd(8 * P, flags)
        mem = HostMemory(8 * P)
        vm.set_user_memory_region2(i % 4, 0, 8 * P, mem, GMEM, gmem, 0)
        vcpu = vm.create_vcpu(i % 3)
        m = gmem.mmap() if flags & uapi.GUEST_MEMFD_FLAG_MMAP else None
        if m is not None:
            m[0] = i
        # close in a different order each time
        order = [vcpu, vm, gmem, m] if i % 2 else [m, gmem, vcpu, vm]
        for obj in order:
            if obj is not None:
                obj.close()
        mem.close()
        assert _fd_count() == base, f"cycle {i}: {_fd_count() - base} fds more than at the start"


def test_dropped_objects_release_fds_on_gc(system: kvmgmem.System) -> None:
    """Objects dropped without close() release their fds and mappings when collected (as Python's own
    files do); the autouse leak check fails this test otherwise."""
    base = _fd_count()
    vm = system.create_vm()
    gmem = vm.create_guest_memfd(4 * P)
    vcpu = vm.create_vcpu(0)
    del vm, gmem, vcpu
    gc.collect()
    assert _fd_count() == base, f"{_fd_count() - base} fds still open after the VM, guest_memfd, vCPU were dropped"
