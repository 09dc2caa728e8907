"""guest_memfd mappings and files as a new user meets them (spec §2.10, §2.11, §2.12): lifetime of a VM
dropped without close(), dup'd fds, madvise, mmap offset/length limits, huge sparse files, memslots over a
private mapping. Expected values are the 6.18 kernel's (this host's), checked on every backend.
"""

from __future__ import annotations

import errno
import gc
import os

import pytest

import kvmgmem
from kvmgmem import uapi

from ._util import GMEM, INIT_SHARED, MMAP, P, raises_kvm, require_cap


def _require_flags(vm: kvmgmem.Vm, backend: str, flags: int) -> int:
    require_cap(vm, uapi.KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS", backend, mask=flags)
    return flags


def _vm_size_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise AssertionError("no VmSize in /proc/self/status")


def _mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return len(f.read().splitlines())


# --- lifetime: a VM dropped without close() (§2.12, §2.14) -------------------------------------------------


def test_dropped_vm_with_self_backed_slot_unmaps(system: kvmgmem.System, backend: str) -> None:
    """A VM whose memslot's userspace is the mapping of its own guest_memfd, dropped without any close():
    once collected, the mapping, the file, the VM and the storage all go (the kernel frees them on the
    last fput). 20 such 1 GiB VMs must not leave 20 mappings / 20 GiB of address space behind."""
    with system.create_vm() as probe:
        _require_flags(probe, backend, MMAP | INIT_SHARED)
    gc.collect()
    maps_before, size_before = _mapping_count(), _vm_size_kib()
    for _ in range(20):
        vm = system.create_vm()
        g = vm.create_guest_memfd(1 << 30, MMAP | INIT_SHARED)
        m = g.mmap()
        vm.set_user_memory_region2(1, 1 << 32, 1 << 30, m, GMEM, g, 0)
        del vm, g, m
    gc.collect()
    grown_maps, grown_kib = _mapping_count() - maps_before, _vm_size_kib() - size_before
    assert grown_maps < 20, f"{grown_maps} mappings left behind by 20 dropped VMs"
    assert grown_kib < (1 << 30) // 1024, f"VmSize grew by {grown_kib} KiB after 20 dropped 1 GiB VMs"


# --- dup'd fds and fstat (§2.11, §2.12) -------------------------------------------------------------------


def test_dup_fd_binds_also_after_original_closed(vm: kvmgmem.Vm, backend: str) -> None:
    """The selftests bind ``dup(gmem_fd)``: a dup'd fd is the same file to ``kvm_gmem_bind``'s ``fget``, and it
    keeps the file (and its bindings' target) alive after the original fd is closed (§2.12: release happens
    on the last close). A second binding of the same range through the dup is the same file: EINVAL."""
    g = vm.create_guest_memfd(4 * P)
    dup = os.dup(g.fd)
    try:
        vm.set_user_memory_region2(1, 1 << 32, P, None, GMEM, dup, 0)
        with raises_kvm(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2"):  # same file, same offset
            vm.set_user_memory_region2(2, 2 << 32, P, None, GMEM, g, 0)
        g.close()
        vm.set_user_memory_region2(2, 2 << 32, P, None, GMEM, dup, P)
        with raises_kvm(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2"):  # the dup still is that file
            vm.set_user_memory_region2(3, 3 << 32, P, None, GMEM, dup, P)
        vm.set_user_memory_region2(1, 1 << 32, 0)
        vm.set_user_memory_region2(2, 2 << 32, 0)
    finally:
        g.close()
        os.close(dup)
    other = os.memfd_create("not-gmem", 0)
    try:
        with raises_kvm(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION2"):  # a memfd is not a guest_memfd
            vm.set_user_memory_region2(1, 1 << 32, P, None, GMEM, other, 0)
    finally:
        os.close(other)


def test_fstat_one_link(vm: kvmgmem.Vm) -> None:
    """§2.11: fstat of a guest_memfd (an anon inode) reports st_nlink 1, st_size the creation size, mode
    0100600, st_blksize 4096."""
    with vm.create_guest_memfd(4 * P) as g:
        st = g.stat()
        assert (st.st_nlink, st.st_size, st.st_mode, st.st_blksize) == (1, 4 * P, 0o100600, P)
