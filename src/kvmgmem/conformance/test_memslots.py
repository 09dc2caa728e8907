"""Memslot conformance: set_memory_region_test.c (cases SR-n), `__kvm_set_memory_region`,
`kvm_gmem_release`, `kvm_gmem_unbind`, and the API's HostMemory pinning and argument rules.

Profile 6.18 (this host's kernel, as measured here): GUEST_MEMFD memslots are allowed on every VM type, so
the SR-4 binding rules run on the DEFAULT VM; overlapping gmem bindings → EINVAL (EEXIST only from 7.2);
GPA overlap → EEXIST.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

import kvmgmem
from kvmgmem import HostMemory, uapi

from ._util import (
    EINVAL,
    GMEM,
    INIT_SHARED,
    MEM_REGION_GPA,
    MEM_REGION_SIZE,
    MEM_REGION_SLOT,
    MMAP,
    P,
    raises_kvm,
    require_cap,
)

V1 = "KVM_SET_USER_MEMORY_REGION"
V2 = "KVM_SET_USER_MEMORY_REGION2"
LOG_DIRTY = uapi.KVM_MEM_LOG_DIRTY_PAGES
READONLY = uapi.KVM_MEM_READONLY
M = 1 << 20


def _raw_fd(obj: object, what: str) -> int:
    fd = getattr(obj, "fd", None)
    assert isinstance(fd, int) and fd >= 0, f"{what} exposes no fd ({fd!r}): every backend's objects have one"
    return fd


@pytest.fixture
def gmem_2m(vm: kvmgmem.Vm) -> Iterator[kvmgmem.GuestMemfd]:
    with vm.create_guest_memfd(MEM_REGION_SIZE, 0) as g:
        yield g


def _add_private(vm: kvmgmem.Vm, fd: object, offset: int = 0, *, slot: int = MEM_REGION_SLOT,
                 gpa: int = MEM_REGION_GPA, size: int = MEM_REGION_SIZE) -> None:  # fmt: skip
    """SR-4's attempt: v2(slot 10, GUEST_MEMFD, gpa 0xc0000000, 2M, uaddr 0, fd, off)."""
    vm.set_user_memory_region2(slot, gpa, size, None, GMEM, fd, offset)  # type: ignore[arg-type]


def _delete(vm: kvmgmem.Vm, slot: int, flags: int = GMEM) -> None:
    vm.set_user_memory_region2(slot, 0, 0, None, flags, None, 0)


# --- SR-1 .. SR-3: flags ------------------------------------------------------------------------------------


def test_sr1_invalid_flags(system: kvmgmem.System, backend: str) -> None:
    """SR-1 (set_memory_region_test.c, `__kvm_set_memory_region`): VM = SW_PROTECTED if available else DEFAULT.
    Supported = LOG_DIRTY | READONLY | GUEST_MEMFD (6.18: gmem slots on every VM type with KVM_CAP_GUEST_MEMFD). For bit
    i in 0..31 not supported (or the v2-only GUEST_MEMFD): v1(slot 0, 1<<i, gpa 0, 2M, uaddr 0) → EINVAL; unless the
    bit is supported, v2(same, fd 0, off 0) → EINVAL too."""
    vm_type = (
        uapi.KVM_X86_SW_PROTECTED_VM
        if uapi.KVM_X86_SW_PROTECTED_VM in system.supported_vm_types
        else uapi.KVM_X86_DEFAULT_VM
    )
    with system.create_vm(vm_type) as vm:
        supported = LOG_DIRTY | READONLY
        if vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD):
            supported |= GMEM
        assert supported == LOG_DIRTY | READONLY | GMEM, "profile 6.18: GUEST_MEMFD slots on every VM type"
        checked_v1 = checked_v2 = 0
        for i in range(32):
            flag = 1 << i
            if supported & flag and flag != GMEM:
                continue
            with raises_kvm(EINVAL, V1):
                vm.set_user_memory_region(0, 0, MEM_REGION_SIZE, None, flag)
            checked_v1 += 1
            if supported & flag:
                continue
            with raises_kvm(EINVAL, V2):
                vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, flag, 0, 0)
            checked_v2 += 1
        assert (checked_v1, checked_v2) == (30, 29)
        # control: the supported flags really are accepted by both ioctls
        vm.set_user_memory_region(0, 0, MEM_REGION_SIZE, None, LOG_DIRTY | READONLY)
        vm.set_user_memory_region(0, 0, 0, None, LOG_DIRTY | READONLY)
        vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, LOG_DIRTY)
        vm.set_user_memory_region2(0, 0, 0, None, LOG_DIRTY)


def test_sr2_log_dirty_with_guest_memfd(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """SR-2 (set_memory_region_test.c, `check_memory_region_flags`): v2(slot 0, LOG_DIRTY|GUEST_MEMFD, gpa 0, 2M, uaddr
    0, fd, 0) → EINVAL (dirty logging of gmem slots is unsupported); without LOG_DIRTY the same call succeeds."""
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, LOG_DIRTY | GMEM, gmem_2m, 0)
    vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, GMEM, gmem_2m, 0)
    _delete(vm, 0)


def test_sr3_readonly_with_guest_memfd(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """SR-3 (set_memory_region_test.c, `check_memory_region_flags`, the Feb 2024 fix): v2(READONLY|GUEST_MEMFD, ...) →
    EINVAL; READONLY alone (no gmem) is accepted on a DEFAULT VM."""
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, READONLY | GMEM, gmem_2m, 0)
    vm.set_user_memory_region2(0, 0, MEM_REGION_SIZE, None, READONLY)
    vm.set_user_memory_region2(0, 0, 0, None, READONLY)


def test_sr2_delete_still_checks_flags(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """`__kvm_set_memory_region`: delete goes through the flag checks — GUEST_MEMFD|LOG_DIRTY with size 0 → EINVAL and
    the slot stays; deleting a slot that does not exist → EINVAL."""
    _add_private(vm, gmem_2m, 0, slot=0, gpa=0)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, 0, 0, None, GMEM | LOG_DIRTY, None, 0)
    _delete(vm, 0)
    with raises_kvm(EINVAL, V2):
        _delete(vm, 0)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(5, 0, 0, None)


# --- SR-4: binding rules (DEFAULT VM on 6.18) ---------------------------------------------------------------


def test_sr4a_kvm_fd_rejected(system: kvmgmem.System, vm: kvmgmem.Vm) -> None:
    """SR-4a (set_memory_region_test.c, `kvm_gmem_bind`): guest_memfd = the /dev/kvm fd → EINVAL."""
    with raises_kvm(EINVAL, V2):
        _add_private(vm, _raw_fd(system, "the System (/dev/kvm)"))


def test_sr4b_vm_fd_rejected(vm: kvmgmem.Vm) -> None:
    """SR-4b (set_memory_region_test.c): guest_memfd = the VM's own fd → EINVAL."""
    with raises_kvm(EINVAL, V2):
        _add_private(vm, _raw_fd(vm, "the Vm"))


def test_sr4c_memfd_fd_rejected(vm: kvmgmem.Vm) -> None:
    """SR-4c (set_memory_region_test.c): guest_memfd = a memfd_create() fd of 2M → EINVAL; /dev/null too
    (as measured on this host)."""
    fd = os.memfd_create("sr4c")
    try:
        os.ftruncate(fd, MEM_REGION_SIZE)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, fd)
    finally:
        os.close(fd)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with raises_kvm(EINVAL, V2):
            _add_private(vm, fd)
    finally:
        os.close(fd)


def test_sr4d_other_vm_gmem_rejected(system: kvmgmem.System, vm: kvmgmem.Vm) -> None:
    """SR-4d (set_memory_region_test.c): the gmem of a second VM → EINVAL on this VM, and binding it to the
    second VM succeeds."""
    with system.create_vm() as vm2, vm2.create_guest_memfd(MEM_REGION_SIZE, 0) as g2:
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g2)
        _add_private(vm2, g2)
        _delete(vm2, MEM_REGION_SLOT)


def test_sr4e_unaligned_offset(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """SR-4e (set_memory_region_test.c, `__kvm_set_memory_region`): own gmem(2M), offset 1..4095 → each EINVAL."""
    for off in range(1, P):
        with raises_kvm(EINVAL, V2):
            _add_private(vm, gmem_2m, off)


def test_sr4f_offset_zero_ok(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """SR-4f (set_memory_region_test.c): own gmem(2M), offset 0 → success; deleting it works."""
    _add_private(vm, gmem_2m, 0)
    _delete(vm, MEM_REGION_SLOT)


def test_sr4_bad_fd_ebadf(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_bind` (`fget` fails; measured on this host too): a GUEST_MEMFD slot whose fd is not open (9999, or -1
    / None) → EBADF."""
    for fd in (9999, -1, None):
        with raises_kvm(errno.EBADF, V2):
            _add_private(vm, fd)


def test_sr4_closed_gmem_ebadf(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_bind`: a closed GuestMemfd object is passed as fd -1 → EBADF."""
    g = vm.create_guest_memfd(MEM_REGION_SIZE, 0)
    g.close()
    with raises_kvm(errno.EBADF, V2):
        _add_private(vm, g)


def test_sr4_offset_range_checks(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_bind` (also measured on this host): offset + size > file size → EINVAL; offset = EOF →
    EINVAL; offset + size wrapping u64 → EINVAL (`__kvm_set_memory_region`); the exact fit at the end of the file is
    accepted."""
    with vm.create_guest_memfd(4 * P, 0) as g:
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 4 * P, size=P)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 2 * P, size=4 * P)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, (1 << 64) - P, size=2 * P)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 0, size=8 * P)
        _add_private(vm, g, 3 * P, size=P)
        _delete(vm, MEM_REGION_SLOT)


def test_sr4_signed_offset_quirk_6_18(vm: kvmgmem.Vm) -> None:
    """Upstream guest_memfd_test's invalid_binding case, run on this host: 6.18's `kvm_gmem_bind` checks ``offset +
    size > i_size`` on a signed loff_t, so a 0x4000-byte slot at gmem offset 0x7ffffffffffff000 (sum wraps negative) is
    *accepted* on 6.18 (7.2 and 6.12-stable reject it with EINVAL)."""
    with vm.create_guest_memfd(4 * P, 0) as g:
        _add_private(vm, g, 0x7FFFFFFFFFFFF000, size=0x4000)
        _delete(vm, MEM_REGION_SLOT)


# --- SR-5: overlap ------------------------------------------------------------------------------------------


def test_sr5_overlapping_bindings(vm: kvmgmem.Vm) -> None:
    """SR-5 (set_memory_region_test.c, `__kvm_set_memory_region` and `kvm_gmem_bind`; profile 6.18 = this host):
    gmem(10M); slot 10 @0xc0000000 4M off 0 and slot 11 @0x180000000 4M off 4M succeed; delete slot 10; recreating slot
    10 with a file range overlapping slot 11's (off 2M, off 6M) → EINVAL (EEXIST only from 7.2); with a GPA range
    overlapping slot 11 (gpa 0x180000000 ± 2M, off 0) → EEXIST. Finally the original slot 10 can be re-added."""
    gpa11 = 0x180000000
    with vm.create_guest_memfd(10 * M, 0) as g:
        _add_private(vm, g, 0, slot=10, gpa=MEM_REGION_GPA, size=4 * M)
        _add_private(vm, g, 4 * M, slot=11, gpa=gpa11, size=4 * M)
        _delete(vm, 10)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 2 * M, slot=10, gpa=MEM_REGION_GPA, size=4 * M)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 6 * M, slot=10, gpa=MEM_REGION_GPA, size=4 * M)
        with raises_kvm(errno.EEXIST, V2):
            _add_private(vm, g, 0, slot=10, gpa=gpa11 - 2 * M, size=4 * M)
        with raises_kvm(errno.EEXIST, V2):
            _add_private(vm, g, 0, slot=10, gpa=gpa11 + 2 * M, size=4 * M)
        _add_private(vm, g, 0, slot=10, gpa=MEM_REGION_GPA, size=4 * M)
        _delete(vm, 10)
        _delete(vm, 11)


def test_sr5_same_offsets_second_slot(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_bind` (as measured on this host): a second slot on the same gmem at the same offset (or a partly
    overlapping one, off 1M) → EINVAL; a disjoint range (off 2M) is fine — one gmem can back several slots."""
    with vm.create_guest_memfd(4 * M, 0) as g:
        _add_private(vm, g, 0, slot=0, gpa=1 << 30, size=2 * M)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 0, slot=1, gpa=2 << 30, size=2 * M)
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g, 1 * M, slot=1, gpa=2 << 30, size=2 * M)
        _add_private(vm, g, 2 * M, slot=1, gpa=2 << 30, size=2 * M)
        _delete(vm, 0)
        _delete(vm, 1)


def test_sr5_gpa_overlap_plain_slots(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region`: GPA overlap between ordinary (non-gmem) slots → EEXIST; adjacent is fine."""
    vm.set_user_memory_region(0, 0x100000, 2 * P, None)
    with raises_kvm(errno.EEXIST, V1):
        vm.set_user_memory_region(1, 0x100000 + P, 2 * P, None)
    with raises_kvm(errno.EEXIST, V1):
        vm.set_user_memory_region(1, 0x100000 - P, 2 * P, None)
    vm.set_user_memory_region(1, 0x100000 + 2 * P, P, None)


# --- SR-6: max slots ----------------------------------------------------------------------------------------


def test_sr6_max_slots(vm: kvmgmem.Vm) -> None:
    """SR-6 (set_memory_region_test.c, `__kvm_set_memory_region`): KVM_CAP_NR_MEMSLOTS (32764 on x86) slots succeed; one
    more (slot id = NR_MEMSLOTS) → EINVAL."""
    n = vm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS)
    assert n == uapi.KVM_USER_MEM_SLOTS == 32764
    for slot in range(n):
        vm.set_user_memory_region(slot, slot * P, P, None)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(n, n * P, P, None)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(n, n * P, P, None)


# --- `__kvm_set_memory_region` other checks -------------------------------------------------------------------


def test_region_alignment_checks(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region`: size not a multiple of 4096, unaligned gpa, unaligned uaddr (+8), gpa+size
    wrapping, slot id ≥ 32764 (also slot -1 = 0xffffffff) → EINVAL; uaddr 0 is fine."""
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0, P + 1, None)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0x800, P, None)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0, P, 0x10008)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, (1 << 64) - P, 2 * P, None)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(-1, 0, P, None)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(32764, 0, P, None)
    vm.set_user_memory_region(0, 0, P, None)


def test_gmem_slot_is_immutable(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """`__kvm_set_memory_region` (as measured on this host): an existing gmem slot can only be deleted — re-issuing the
    identical create, moving it (new gpa) and dropping GUEST_MEMFD → EINVAL; delete via the v1 ioctl works."""
    _add_private(vm, gmem_2m, 0)
    with raises_kvm(EINVAL, V2):
        _add_private(vm, gmem_2m, 0)
    with raises_kvm(EINVAL, V2):
        _add_private(vm, gmem_2m, 0, gpa=MEM_REGION_GPA + MEM_REGION_SIZE)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, None, 0, None, 0)
    vm.set_user_memory_region(MEM_REGION_SLOT, 0, 0, None)
    # really gone: the slot id and the file range are free again
    _add_private(vm, gmem_2m, 0)
    _delete(vm, MEM_REGION_SLOT)


# --- `kvm_gmem_release` / `kvm_gmem_unbind`: delete, re-add, close --------------------------------------------


def test_2_13_delete_bound_slot_keeps_gmem_data(vm: kvmgmem.Vm, backend: str) -> None:
    """`kvm_gmem_unbind`, virt/kvm/guest_memfd.c: deleting a gmem slot unbinds but does not free pages — data written
    through the (MMAP|INIT_SHARED) mapping survives the delete and a re-bind of the same file range."""
    require_cap(vm, uapi.KVM_CAP_GUEST_MEMFD_FLAGS, "KVM_CAP_GUEST_MEMFD_FLAGS", backend, mask=MMAP | INIT_SHARED)
    pattern = bytes(range(256)) * (2 * P // 256)
    with vm.create_guest_memfd(4 * P, MMAP | INIT_SHARED) as g:
        m = g.mmap()
        try:
            _add_private(vm, g, 2 * P, size=2 * P)
            m[2 * P :] = pattern
            _delete(vm, MEM_REGION_SLOT)
            assert m[2 * P :] == pattern
            _add_private(vm, g, 2 * P, size=2 * P)
            assert m[2 * P :] == pattern
            _delete(vm, MEM_REGION_SLOT)
            assert m[: 2 * P] == bytes(2 * P)
        finally:
            m.close()


def test_2_13_readd_same_range_after_delete(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """`kvm_gmem_unbind` (as measured on this host): after deleting a gmem slot the same slot id, GPA and file range
    can be added again (several times), and another slot id can take the range too."""
    for _ in range(3):
        _add_private(vm, gmem_2m, 0)
        _delete(vm, MEM_REGION_SLOT)
    _add_private(vm, gmem_2m, 0, slot=MEM_REGION_SLOT + 1)
    _delete(vm, MEM_REGION_SLOT + 1)


def test_2_12_close_gmem_while_bound_then_delete(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_release` (as measured on this host): closing the gmem while a slot is bound works; the slot stays
    (re-creating it is EINVAL, its GPA range is still taken → EEXIST), and deleting it afterwards works."""
    g = vm.create_guest_memfd(MEM_REGION_SIZE, 0)
    _add_private(vm, g, 0)
    g.close()
    with vm.create_guest_memfd(MEM_REGION_SIZE, 0) as g2:
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g2, 0)
        with raises_kvm(errno.EEXIST, V2):
            _add_private(vm, g2, 0, slot=MEM_REGION_SLOT + 1)
        _delete(vm, MEM_REGION_SLOT)
        _add_private(vm, g2, 0, slot=MEM_REGION_SLOT + 1)
        _delete(vm, MEM_REGION_SLOT + 1)


def test_2_12_memslots_do_not_pin_gmem(vm: kvmgmem.Vm) -> None:
    """`kvm_gmem_release`: memslots do not hold the gmem file — after close() with a slot bound,
    its fd number is really closed (the kernel file is released)."""
    g = vm.create_guest_memfd(MEM_REGION_SIZE, 0)
    fd = g.fd
    _add_private(vm, g, 0)
    g.close()
    if os.path.exists(f"/proc/self/fd/{fd}"):
        assert "kvm-gmem" not in os.readlink(f"/proc/self/fd/{fd}")
    _delete(vm, MEM_REGION_SLOT)


# --- HostMemory pinning -----------------------------------------------------------------------------------------


def test_hostmem_pinned_while_slot_uses_it(vm: kvmgmem.Vm) -> None:
    """API (hostmem.py): HostMemory.close() is refused with EBUSY while a memslot uses it (naming the slot),
    the memory stays usable, and close works once the slot is deleted."""
    mem = HostMemory(4 * P)
    try:
        vm.set_user_memory_region(3, 0x10000, 4 * P, mem)
        with raises_kvm(errno.EBUSY, "HostMemory.close") as r:
            mem.close()
        assert r.error is not None and "memslot 3" in str(r.error)
        assert not mem.closed
        assert mem.pinned_by
        mem[:4] = b"live"
        assert mem[:4] == b"live"
        vm.set_user_memory_region(3, 0x10000, 0, mem)
        assert mem.pinned_by == []
        mem.close()
        assert mem.closed
    finally:
        if not mem.closed:
            vm.close()
            mem.close()


def test_hostmem_pinned_by_gmem_slot_v2(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """API: a REGION2 gmem slot pins its userspace HostMemory the same way; delete unpins."""
    mem = HostMemory(MEM_REGION_SIZE)
    try:
        vm.set_user_memory_region2(MEM_REGION_SLOT, MEM_REGION_GPA, MEM_REGION_SIZE, mem, GMEM, gmem_2m, 0)
        with raises_kvm(errno.EBUSY, "HostMemory.close"):
            mem.close()
        _delete(vm, MEM_REGION_SLOT)
        mem.close()
    finally:
        if not mem.closed:
            vm.close()
            mem.close()


def test_hostmem_released_when_vm_closes(system: kvmgmem.System) -> None:
    """API: closing the VM releases every pin its memslots held, so HostMemory.close() then works."""
    mem = HostMemory(2 * P)
    vm = system.create_vm()
    try:
        vm.set_user_memory_region(0, 0, P, mem)
        vm.set_user_memory_region(1, P, P, mem)
        with raises_kvm(errno.EBUSY, "HostMemory.close"):
            mem.close()
        vm.close()
        assert mem.pinned_by == []
        mem.close()
        assert mem.closed
    finally:
        vm.close()
        mem.close()


def test_hostmem_closed_rejected(vm: kvmgmem.Vm) -> None:
    """API: a closed HostMemory cannot back a memslot (EFAULT naming the op)."""
    mem = HostMemory(P)
    mem.close()
    with raises_kvm(errno.EFAULT, V1):
        vm.set_user_memory_region(0, 0, P, mem)


# --- argument types ---------------------------------------------------------------------------------------------


def test_bad_argument_types(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """API argument rule (api.py): wrong Python types → TypeError, values wider than the field → ValueError,
    each naming the operation; negative values are passed as two's complement (kernel errno)."""
    with pytest.raises(TypeError, match=V2):
        vm.set_user_memory_region2("0", 0, P, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=V2):
        vm.set_user_memory_region2(0, 0.0, P, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=V2):
        vm.set_user_memory_region2(0, 0, P, None, GMEM, "3", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=V2):
        vm.set_user_memory_region2(0, 0, P, "nope", 0)
    with pytest.raises(TypeError, match=V1):
        vm.set_user_memory_region(0, 0, P, None, b"\x01")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=V2):
        vm.set_user_memory_region2(1 << 32, 0, P, None)
    with pytest.raises(ValueError, match=V2):
        vm.set_user_memory_region2(0, 0, P, None, 1 << 32)
    with pytest.raises(ValueError, match=V2):
        vm.set_user_memory_region2(0, 1 << 64, P, None)
    with pytest.raises(ValueError, match=V2):
        vm.set_user_memory_region2(0, 0, P, None, GMEM, gmem_2m, 1 << 64)
    with pytest.raises(ValueError, match=V1):
        vm.set_user_memory_region(0, 0, P, 1 << 64)
    # negative gpa → two's complement → gpa+size wraps → the kernel's EINVAL
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, -P, 2 * P, None)


def test_closed_vm_ebadf(system: kvmgmem.System) -> None:
    """Lifetime: memslot ioctls on a closed VM → EBADF naming the op."""
    vm = system.create_vm()
    vm.close()
    with raises_kvm(errno.EBADF, V2):
        vm.set_user_memory_region2(0, 0, P, None)
    with raises_kvm(errno.EBADF, V1):
        vm.set_user_memory_region(0, 0, P, None)


# --- `__kvm_set_memory_region` later steps: ranges, modify rules, check order ---------------------------------


def test_2_5_max_nr_pages(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region`: a slot of more than KVM_MEM_MAX_NR_PAGES (2^31 - 1) pages → EINVAL."""
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0, (uapi.KVM_MEM_MAX_NR_PAGES + 1) * P, None)
    with raises_kvm(EINVAL, V2):
        vm.set_user_memory_region2(0, 0, (uapi.KVM_MEM_MAX_NR_PAGES + 1) * P, None)


def test_2_5_userspace_range(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region`: [uaddr, uaddr+size) must be a user range — a kernel address → EINVAL; a slot ending at
    the top of the 4-level user address space (0x7ffffffff000) is fine, one page more → EINVAL."""
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0, P, 0xFFFF800000000000)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 0, 2 * P, 0x7FFFFFFFE000)
    vm.set_user_memory_region(0, 0, P, 0x7FFFFFFFE000)
    vm.set_user_memory_region(0, 0, 0, None)


def test_2_5_gpa_beyond_max_gpa(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region` (x86 arch prepare; 52-bit GPA on this shadow-paging host): a slot whose last gfn is
    below 2^52 is accepted, one starting at 2^52 → EINVAL."""
    vm.set_user_memory_region(0, (1 << 52) - P, P, None)
    vm.set_user_memory_region(0, 0, 0, None)
    with raises_kvm(EINVAL, V1):
        vm.set_user_memory_region(0, 1 << 52, P, None)


def test_2_5_bind_errors_precede_arch_checks(vm: kvmgmem.Vm, gmem_2m: kvmgmem.GuestMemfd) -> None:
    """`__kvm_set_memory_region`: bind errors come before the arch range check (a gmem slot at gpa 2^52 with a closed fd
    → EBADF, not EINVAL); when the commit then fails (good fd, gpa 2^52 → EINVAL) the binding is undone, so the
    same file range can be bound right after."""
    with raises_kvm(errno.EBADF, V2):
        _add_private(vm, 9999, 0, gpa=1 << 52, size=P)
    with raises_kvm(EINVAL, V2):
        _add_private(vm, gmem_2m, 0, gpa=1 << 52, size=P)
    _add_private(vm, gmem_2m, 0, size=P)
    _delete(vm, MEM_REGION_SLOT)


def test_2_5_modify_rules(vm: kvmgmem.Vm) -> None:
    """`__kvm_set_memory_region` for an ordinary slot: toggling READONLY, changing npages or userspace_addr → EINVAL;
    moving (new gpa), a flags-only change (LOG_DIRTY) and an identical call succeed; adding GUEST_MEMFD to an
    existing non-gmem slot → EINVAL."""
    with HostMemory(2 * P) as a, HostMemory(2 * P) as b, vm.create_guest_memfd(P, 0) as g:
        vm.set_user_memory_region(0, 0x100000, P, a)
        with raises_kvm(EINVAL, V1):
            vm.set_user_memory_region(0, 0x100000, P, a, READONLY)
        with raises_kvm(EINVAL, V1):
            vm.set_user_memory_region(0, 0x100000, 2 * P, a)
        with raises_kvm(EINVAL, V1):
            vm.set_user_memory_region(0, 0x100000, P, b)
        vm.set_user_memory_region(0, 0x200000, P, a)
        vm.set_user_memory_region(0, 0x200000, P, a, LOG_DIRTY)
        vm.set_user_memory_region(0, 0x200000, P, a, LOG_DIRTY)
        with raises_kvm(EINVAL, V2):
            vm.set_user_memory_region2(0, 0x200000, P, a, GMEM, g, 0)
        # the move really happened: the old range is free, the new one taken
        vm.set_user_memory_region(1, 0x100000, P, b)
        with raises_kvm(errno.EEXIST, V1):
            vm.set_user_memory_region(2, 0x200000, P, b)
        vm.set_user_memory_region(0, 0, 0, a)
        vm.set_user_memory_region(1, 0, 0, b)


# --- SW_PROTECTED VM (the selftest's own VM type for SR-4) ----------------------------------------------------


def test_sr4_binding_rules_sw_protected(system: kvmgmem.System, protected_vm: kvmgmem.Vm) -> None:
    """SR-4 a–f on a SW_PROTECTED VM (set_memory_region_test.c, where the selftest runs them): /dev/kvm fd, VM fd, memfd
    and another SW_PROTECTED VM's gmem → EINVAL; offsets 1..4095 → EINVAL; offset 0 → success."""
    vm = protected_vm
    memfd = os.memfd_create("sr4")
    try:
        for fd in (_raw_fd(system, "the System"), _raw_fd(vm, "the Vm"), memfd):
            with raises_kvm(EINVAL, V2):
                _add_private(vm, fd)
    finally:
        os.close(memfd)
    with system.create_vm(uapi.KVM_X86_SW_PROTECTED_VM) as vm2, vm2.create_guest_memfd(MEM_REGION_SIZE, 0) as g2:
        with raises_kvm(EINVAL, V2):
            _add_private(vm, g2)
        _add_private(vm2, g2)
    with vm.create_guest_memfd(MEM_REGION_SIZE, 0) as g:
        for off in range(1, P):
            with raises_kvm(EINVAL, V2):
                _add_private(vm, g, off)
        _add_private(vm, g, 0)
        _delete(vm, MEM_REGION_SLOT)


def test_sw_protected_single_address_space(protected_vm: kvmgmem.Vm) -> None:
    """`kvm_arch_nr_memslot_as_ids`/`__kvm_set_memory_region`: VMs with private memory have one memslot address space —
    as_id 1 → EINVAL; as_id 0 works."""
    with raises_kvm(EINVAL, V1):
        protected_vm.set_user_memory_region(1 << 16, 0, P, None)
    with raises_kvm(EINVAL, V2):
        protected_vm.set_user_memory_region2((1 << 16) | MEM_REGION_SLOT, 0, P, None)
    protected_vm.set_user_memory_region(0, 0, P, None)
