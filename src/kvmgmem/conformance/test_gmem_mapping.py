"""guest_memfd mappings and files as a new user meets them (`kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`,
`kvm_gmem_setattr`, `kvm_gmem_release`): lifetime of a VM dropped without close(), dup'd fds, madvise, mmap
offset/length limits, huge sparse files, memslots over a private mapping. Expected values are the 6.18 kernel's (this
host's), checked on every backend.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import mmap
import os

import pytest

import kvmgmem
from kvmgmem import uapi
from kvmgmem.guest import Asm, Done, GuestImage
from kvmgmem.guest import routines as R
from kvmgmem.guest import ucall as U
from kvmgmem.libc import MADV_COLLAPSE, MADV_HUGEPAGE

from ._util import GMEM, INIT_SHARED, MMAP, P, raises_kvm, require_cap
from .fixtures import MakeGuest


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


# --- lifetime: a VM dropped without close() (`kvm_gmem_release`; a guest_memfd holds a VM reference) ----------


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


# --- dup'd fds and fstat (`kvm_gmem_setattr`, `kvm_gmem_release`) ---------------------------------------------


def test_dup_fd_binds_also_after_original_closed(vm: kvmgmem.Vm, backend: str) -> None:
    """The selftests bind ``dup(gmem_fd)``: a dup'd fd is the same file to ``kvm_gmem_bind``'s ``fget``, and it
    keeps the file (and its bindings' target) alive after the original fd is closed (`kvm_gmem_release`: release happens
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
    """`kvm_gmem_setattr`: fstat of a guest_memfd (an anon inode) reports st_nlink 1, st_size the creation size, mode
    0100600, st_blksize 4096."""
    with vm.create_guest_memfd(4 * P) as g:
        st = g.stat()
        assert (st.st_nlink, st.st_size, st.st_mode, st.st_blksize) == (1, 4 * P, 0o100600, P)


# --- madvise on a guest_memfd mapping (`kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`) -------------------------


def test_madvise_remove_frees_and_bad_advice_einval(vm: kvmgmem.Vm, backend: str) -> None:
    """MADV_REMOVE punches the file (``madvise_remove`` → fallocate PUNCH_HOLE|KEEP_SIZE): the data reads back
    zero, other pages keep theirs. MADV_FREE (shared mapping), unknown advice, an unaligned start and
    MADV_COLLAPSE are EINVAL, as KvmError with op "madvise"; MADV_HUGEPAGE and MADV_DONTNEED are accepted and
    MADV_DONTNEED keeps the data (it is in the file)."""
    _require_flags(vm, backend, MMAP | INIT_SHARED)
    with vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED) as g, g.mmap() as m:
        m[:4] = b"gone"
        m[P : P + 4] = b"kept"
        m.madvise(mmap.MADV_REMOVE, 0, P)
        assert (m[:4], m[P : P + 4]) == (bytes(4), b"kept")
        for advice, start in ((mmap.MADV_FREE, 0), (999, 0), (mmap.MADV_DONTNEED, 100), (MADV_COLLAPSE, 0)):
            with raises_kvm(errno.EINVAL, "madvise"):
                m.madvise(advice, start, P)
        m.madvise(MADV_HUGEPAGE)
        m.madvise(mmap.MADV_DONTNEED, P, P)
        assert m[P : P + 4] == b"kept"


# --- mmap offset and length limits (do_mmap, file_mmap_ok) ------------------------------------------------


@pytest.mark.parametrize("flags", [pytest.param(0, id="F0"), pytest.param(MMAP | INIT_SHARED, id="MMAP|INIT_SHARED")])
def test_mmap_offset_overflow_and_length_limit(vm: kvmgmem.Vm, backend: str, flags: int) -> None:
    """The generic checks of mmap(2) come before ``kvm_gmem_mmap``'s: an offset whose page index passes the
    maximum file size (2^63-4096, -4096, 2^64-4096) → EOVERFLOW; a length above the user address space
    (TASK_SIZE = 2^47-4096) → ENOMEM; an unaligned offset or length 0 → EINVAL — for every file, so also before
    the ENODEV of a file without GUEST_MEMFD_FLAG_MMAP."""
    if flags:
        _require_flags(vm, backend, flags)
    with vm.create_guest_memfd(4 * P, flags) as g:
        for offset in (2**63 - P, -P, 2**64 - P):
            with raises_kvm(errno.EOVERFLOW, "mmap"):
                g.mmap(P, offset)
        for length in (1 << 47, (1 << 64) - P):
            with raises_kvm(errno.ENOMEM, "mmap"):
                g.mmap(length)
        with raises_kvm(errno.EINVAL, "mmap"):
            g.mmap(P, 100)
        with raises_kvm(errno.EINVAL, "mmap"):
            g.mmap(0)


def test_mmap_large_file_not_refused_by_overcommit(vm: kvmgmem.Vm, backend: str) -> None:
    """mmap(2) of a 64 GiB guest_memfd succeeds (the mapping is lazy); so must ``GuestMemfd.mmap()`` — no
    extra reservation that overcommit would refuse."""
    _require_flags(vm, backend, MMAP | INIT_SHARED)
    with vm.create_guest_memfd(64 << 30, MMAP | INIT_SHARED) as g, g.mmap() as m:
        assert len(m) == 64 << 30
        m[-4:] = b"last"
        assert m[-4:] == b"last"


# --- memslots over a guest_memfd mapping (`__kvm_set_memory_region`, `kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`) ---


@pytest.mark.parametrize("v2", [pytest.param(False, id="REGION"), pytest.param(True, id="REGION2")])
def test_memslot_over_private_mapping_accepted(vm: kvmgmem.Vm, backend: str, v2: bool) -> None:
    """The mapping of an MMAP-only (not INIT_SHARED) guest_memfd is valid userspace for a memslot: KVM only
    records the address (``__kvm_set_memory_region`` checks alignment and ``access_ok``, never touches the
    pages), so REGION and REGION2 (with or without the file bound) accept it. The mapping is pinned while the
    slot uses it (EBUSY on close), and closes once the slot is deleted."""
    _require_flags(vm, backend, MMAP)
    with vm.create_guest_memfd(4 * P, MMAP) as g:
        m = g.mmap()
        try:
            if v2:
                vm.set_user_memory_region2(1, 1 << 32, 4 * P, m, GMEM, g, 0)
                vm.set_user_memory_region2(2, 2 << 32, 4 * P, m)
            else:
                vm.set_user_memory_region(1, 1 << 32, 4 * P, m)
            with raises_kvm(errno.EBUSY, "GmemMapping.close"):
                m.close()
            vm.set_user_memory_region(1, 1 << 32, 0)
            if v2:
                vm.set_user_memory_region(2, 2 << 32, 0)
        finally:
            for slot, gpa in ((1, 1 << 32), (2, 2 << 32)):  # after a failure: whatever slot is left
                with contextlib.suppress(kvmgmem.KvmError):
                    vm.set_user_memory_region(slot, gpa, 0)
            m.close()
        assert m.closed


# --- files above 32 TiB (`kvm_gmem_create`: size is any positive page-aligned signed 64-bit value) ------------


@pytest.mark.parametrize("size", [pytest.param(1 << 46, id="64TiB"), pytest.param(2**63 - P, id="2^63-4096")])
def test_huge_sparse_file_maps_and_allocates(vm: kvmgmem.Vm, backend: str, size: int) -> None:
    """A guest_memfd far above the host's memory is sparse: it is created, its last pages map, hold data and
    preallocate (fallocate KEEP_SIZE), punch back to zero, and its fstat size is the creation size."""
    _require_flags(vm, backend, MMAP | INIT_SHARED)
    with vm.create_guest_memfd(size, MMAP | INIT_SHARED) as g:
        assert g.stat().st_size == size
        g.fallocate(uapi.FALLOC_FL_KEEP_SIZE, size - 4 * P, 4 * P)
        with g.mmap(2 * P, size - 2 * P) as m:
            m[-4:] = b"tail"
            assert m[-4:] == b"tail"
            g.punch_hole(size - P, P)
            assert m[-4:] == bytes(4)


def test_guest_round_trip_at_end_of_huge_file(system: kvmgmem.System, backend: str, make_guest: MakeGuest) -> None:
    """GM-13 with the slot bound to the last page of a 2^63-4096-byte guest_memfd (hva: that page's mapping):
    the guest reads what the host wrote there and its write is what a fresh host mapping reads."""
    want = MMAP | INIT_SHARED
    require_cap(system, uapi.KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS", backend, mask=want)
    gpa, size = 4 << 30, 2**63 - P
    a = Asm()
    R.verify(a, gpa, P, 0xAA, "reads what the host wrote")
    R.fill(a, gpa, P, 0xFF)
    U.done(a)
    g = make_guest(GuestImage(a))
    with g.vm.create_guest_memfd(size, want) as gmem:
        mapping = gmem.mmap(P, size - P)
        try:
            g.add_memory(1, gpa, mapping, flags=GMEM, guest_memfd=gmem, guest_memfd_offset=size - P)
            mapping[:] = b"\xaa" * P
            assert isinstance(g.vcpus[0].run(30.0), Done)
            with gmem.mmap(P, size - P) as again:
                assert again[:] == b"\xff" * P
        finally:
            g.close()
            mapping.close()
