"""KVM_SET_USER_MEMORY_REGION(2) on the sim: `__kvm_set_memory_region` check order A–N, kvm_gmem_bind, selftest SR-n."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends.sim import SimSystem, SimVm

from .conftest import GMEM, M2, MMAP, P

GPA = 0xC0000000
SLOT = 10
RO = uapi.KVM_MEM_READONLY
LOG = uapi.KVM_MEM_LOG_DIRTY_PAGES


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(KvmError) as info:
        fn()
    return info.value.errno


@pytest.mark.parametrize("vm_type", [0, 1])
def test_SR_1_invalid_flags(make_vm: Callable[..., SimVm], vm_type: int) -> None:
    """SR-1: every unsupported bit → EINVAL on v1 and v2; GUEST_MEMFD → EINVAL on v1 only."""
    vm = make_vm(vm_type)
    for bit in range(32):
        flag = 1 << bit
        if flag in (LOG, RO):
            continue
        assert errno_of(lambda f=flag: vm.set_user_memory_region(0, 0, M2, None, f)) == errno.EINVAL
        if flag == GMEM:
            continue
        assert errno_of(lambda f=flag: vm.set_user_memory_region2(0, 0, M2, None, f, 0, 0)) == errno.EINVAL


def test_SR_1_6_8_default_vm_rejects_gmem_flag(open_sim: Callable[..., SimSystem]) -> None:
    """`check_memory_region_flags` (6.8–6.17): GUEST_MEMFD memslots only on private-memory VMs."""
    with open_sim("6.8").create_vm(0) as vm, open_sim("6.8").create_vm(1) as pvm:
        assert vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD) == 0
        assert errno_of(lambda: vm.set_user_memory_region2(0, 0, M2, None, GMEM, 0, 0)) == errno.EINVAL
        with pvm.create_guest_memfd(M2) as g:
            pvm.set_user_memory_region2(0, 0, M2, None, GMEM, g, 0)


@pytest.mark.parametrize("extra", [LOG, RO])
def test_SR_2_SR_3_log_dirty_or_readonly_with_gmem(pvm: SimVm, extra: int) -> None:
    """SR-2 (LOG_DIRTY|GUEST_MEMFD) and SR-3 (READONLY|GUEST_MEMFD) → EINVAL."""
    with pvm.create_guest_memfd(M2) as g:
        assert errno_of(lambda: pvm.set_user_memory_region2(0, 0, M2, None, GMEM | extra, g, 0)) == errno.EINVAL


def test_SR_4_add_private_region(make_vm: Callable[..., SimVm], simsys: SimSystem) -> None:
    """SR-4 a–f: /dev/kvm fd, VM fd, memfd, another VM's gmem → EINVAL; unaligned offsets → EINVAL; ok."""
    vm, other = make_vm(1), make_vm(1)

    def add(fd: object, off: int = 0) -> None:
        vm.set_user_memory_region2(SLOT, GPA, M2, None, GMEM, fd, off)  # type: ignore[arg-type]

    assert errno_of(lambda: add(simsys.fd)) == errno.EINVAL
    assert errno_of(lambda: add(vm.fd)) == errno.EINVAL
    memfd = os.memfd_create("x")
    try:
        os.ftruncate(memfd, M2)
        assert errno_of(lambda: add(memfd)) == errno.EINVAL
    finally:
        os.close(memfd)
    with other.create_guest_memfd(M2) as og, vm.create_guest_memfd(M2) as g:
        assert errno_of(lambda: add(og)) == errno.EINVAL
        other.set_user_memory_region2(SLOT, GPA, M2, None, GMEM, og, 0)
        for off in (1, 100, P - 1):
            assert errno_of(lambda o=off: add(g, o)) == errno.EINVAL
        add(g, 0)


def test_SR_4_bad_fds_ebadf(pvm: SimVm) -> None:
    """`kvm_gmem_bind` (`fget` fails): a closed fd, -1 or None → EBADF (this host: fd 9999 → EBADF)."""
    g = pvm.create_guest_memfd(M2)
    g.close()
    for fd in (9999, -1, None, g):
        assert errno_of(lambda f=fd: pvm.set_user_memory_region2(SLOT, GPA, M2, None, GMEM, f, 0)) == errno.EBADF


@pytest.mark.parametrize(
    "profile, overlap_errno", [("6.8", errno.EINVAL), ("6.18", errno.EINVAL), ("7.2", errno.EEXIST)]
)
def test_SR_5_overlapping_bindings(open_sim: Callable[..., SimSystem], profile: str, overlap_errno: int) -> None:
    """SR-5: file-offset overlap → EINVAL ≤7.1 / EEXIST 7.2; GPA overlap → EEXIST in every version."""
    with open_sim(profile).create_vm(1) as vm, vm.create_guest_memfd(10 << 20) as g:
        vm.set_user_memory_region2(10, GPA, 4 << 20, None, GMEM, g, 0)
        vm.set_user_memory_region2(11, 0x180000000, 4 << 20, None, GMEM, g, 4 << 20)
        vm.set_user_memory_region2(10, 0, 0, None, GMEM, None, 0)
        for off in (2 << 20, 6 << 20):
            assert (
                errno_of(lambda o=off: vm.set_user_memory_region2(10, GPA, 4 << 20, None, GMEM, g, o)) == overlap_errno
            )
        for gpa in (0x180000000 - M2, 0x180000000 + M2):
            assert errno_of(lambda a=gpa: vm.set_user_memory_region2(10, a, 4 << 20, None, GMEM, g, 0)) == errno.EEXIST


def test_SR_6_max_slots(open_sim: Callable[..., SimSystem]) -> None:
    """SR-6: CAP_NR_MEMSLOTS slots succeed, one more → EINVAL (profile option nr_memslots keeps it quick)."""
    with open_sim(nr_memslots=509).create_vm() as vm:
        n = vm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS)
        assert n == 509
        for i in range(n):
            vm.set_user_memory_region(i, i * M2, M2)
        assert errno_of(lambda: vm.set_user_memory_region(n, n * M2, M2)) == errno.EINVAL


def test_SR_6_full_slot_count(dvm: SimVm) -> None:
    """SR-6 at the real x86 number: 32764 user slots."""
    n = dvm.check_extension(uapi.KVM_CAP_NR_MEMSLOTS)
    assert n == 32764
    for i in range(n):
        dvm.set_user_memory_region(i, i * P, P)
    assert errno_of(lambda: dvm.set_user_memory_region(n, n * P, P)) == errno.EINVAL


@pytest.mark.parametrize("profile, ok", [("6.18", True), ("6.8", True), ("7.2", False)])
def test_2_5_M4_signed_offset_wrap(open_sim: Callable[..., SimSystem], profile: str, ok: bool) -> None:
    """Upstream guest_memfd_test's invalid_binding case (run on this host): offset 0x7ffffffffffff000 with size 0x4000
    succeeds ≤7.1 (signed loff_t wraps negative) and is EINVAL on 7.2 (unsigned)."""
    with open_sim(profile).create_vm(1) as vm, vm.create_guest_memfd(M2) as g:
        call = lambda: vm.set_user_memory_region2(SLOT, GPA, 0x4000, None, GMEM, g, 0x7FFFFFFFFFFFF000)  # noqa: E731
        if ok:
            call()
        else:
            assert errno_of(call) == errno.EINVAL


def test_2_5_check_order(pvm: SimVm) -> None:
    """`__kvm_set_memory_region`: each error is reported by the first failing check (A flags, B size, C gpa, D uaddr, E
    offset, F as_id, G wrap, H too many pages, then bind, then N max GPA)."""
    f = GMEM
    region = pvm.set_user_memory_region2
    with pvm.create_guest_memfd(M2) as g:
        assert errno_of(lambda: region(0, 1, 1, 1, 1 << 5, g, 1)) == errno.EINVAL  # A
        assert errno_of(lambda: region(0, 1, 1, 1, f, 9999, 1)) == errno.EINVAL  # B (before EBADF)
        assert errno_of(lambda: region(0, (1 << 64) - P, M2, None, f, 9999, 0)) == errno.EINVAL  # G before bind
        assert errno_of(lambda: region(1 << 16, 0, M2, None, f, 9999, 0)) == errno.EINVAL  # F: 1 AS on private VM
        assert errno_of(lambda: region(0, 0, M2, None, f, 9999, 0)) == errno.EBADF  # bind step 1
        # bind errors take precedence over the arch max-GPA check (N)
        assert errno_of(lambda: region(0, 1 << 60, M2, None, f, 9999, 0)) == errno.EBADF
        assert errno_of(lambda: region(0, 1 << 60, M2, None, f, g, 0)) == errno.EINVAL
        assert errno_of(lambda: region(0, 0, 1 << 44, None, 0, None, 0)) == errno.EINVAL  # H
        region(0, 0, M2, None, f, g, 0)


def test_2_5_D_userspace_addr(dvm: SimVm) -> None:
    """`__kvm_set_memory_region`: unaligned userspace_addr, or a range past the user address limit → EINVAL; 0 is
    fine."""
    assert errno_of(lambda: dvm.set_user_memory_region(0, 0, M2, 8)) == errno.EINVAL
    assert errno_of(lambda: dvm.set_user_memory_region(0, 0, M2, 0x7FFFFFFFF000)) == errno.EINVAL
    dvm.set_user_memory_region(0, 0, M2, 0)


def test_2_5_I_delete(dvm: SimVm) -> None:
    """`__kvm_set_memory_region`: deleting a missing slot → EINVAL; flags are still validated on delete."""
    assert errno_of(lambda: dvm.set_user_memory_region(3, 0, 0)) == errno.EINVAL
    dvm.set_user_memory_region(3, 0, M2)
    assert errno_of(lambda: dvm.set_user_memory_region2(3, 0, 0, None, GMEM | LOG)) == errno.EINVAL
    dvm.set_user_memory_region(3, 0, 0)


def test_2_5_J_modify_rules(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`__kvm_set_memory_region`: gmem slots are immutable; uaddr/size/READONLY changes → EINVAL; identical → no-op;
    moves and LOG_DIRTY toggles are accepted; K: a move onto another slot → EEXIST."""
    mem = hostmem(M2)
    with dvm.create_guest_memfd(M2, MMAP) as g:
        dvm.set_user_memory_region2(1, GPA, M2, mem, GMEM, g, 0)
        assert errno_of(lambda: dvm.set_user_memory_region2(1, GPA, M2, mem, GMEM, g, 0)) == errno.EINVAL
        assert errno_of(lambda: dvm.set_user_memory_region2(1, GPA + M2, M2, mem, GMEM, g, 0)) == errno.EINVAL
        # dropping GUEST_MEMFD by a flags-only update: EINVAL on 6.18 (Dec 2025 fix; so on this host)
        assert errno_of(lambda: dvm.set_user_memory_region2(1, GPA, M2, mem, 0)) == errno.EINVAL
    dvm.set_user_memory_region(2, 0, M2, mem)
    dvm.set_user_memory_region(2, 0, M2, mem)  # identical: no-op
    assert errno_of(lambda: dvm.set_user_memory_region(2, 0, M2, mem, RO)) == errno.EINVAL
    assert errno_of(lambda: dvm.set_user_memory_region(2, 0, 2 * M2, mem)) == errno.EINVAL
    dvm.set_user_memory_region(2, 0, M2, mem, LOG)  # FLAGS_ONLY
    assert errno_of(lambda: dvm.set_user_memory_region(2, GPA, M2, mem, LOG)) == errno.EEXIST  # onto slot 1
    dvm.set_user_memory_region(2, 4 * M2, M2, mem, LOG)  # MOVE
    assert [s["base_gfn"] for s in dvm.introspect()["memslots"] if s["slot"] == 2] == [4 * M2 // P]


def test_2_5_J_6_8_flag_drop_accepted(open_sim: Callable[..., SimSystem]) -> None:
    """`__kvm_set_memory_region` (before the Dec 2025 fix): a FLAGS_ONLY update dropping GUEST_MEMFD is accepted and
    unbinds."""
    with open_sim("6.8").create_vm(1) as vm, vm.create_guest_memfd(M2) as g:
        vm.set_user_memory_region2(1, GPA, M2, None, GMEM, g, 0)
        vm.set_user_memory_region2(1, GPA, M2, None, 0)
        assert g.sim.bindings.is_uniform(0, 1 << 40, None)


def test_2_5_F_smm_address_space(dvm: SimVm, pvm: SimVm, open_sim: Callable[..., SimSystem]) -> None:
    """`kvm_arch_nr_memslot_as_ids`/`__kvm_set_memory_region`: DEFAULT VMs have 2 address spaces, private VMs 1;
    ``address_spaces=1`` mirrors hosts without SMM."""
    dvm.set_user_memory_region(1 << 16, 0, M2)
    assert dvm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 2
    assert pvm.check_extension(uapi.KVM_CAP_MULTI_ADDRESS_SPACE) == 1
    assert errno_of(lambda: pvm.set_user_memory_region(1 << 16, 0, M2)) == errno.EINVAL
    with open_sim(address_spaces=1).create_vm() as vm:
        assert errno_of(lambda: vm.set_user_memory_region(1 << 16, 0, M2)) == errno.EINVAL


def test_2_13_rebind_after_delete_keeps_data(dvm: SimVm) -> None:
    """`kvm_gmem_unbind`: deleting a gmem slot unbinds without freeing; the same range can be bound again."""
    with dvm.create_guest_memfd(M2, MMAP | 2) as g, g.mmap() as m:
        dvm.set_user_memory_region2(1, GPA, M2, None, GMEM, g, 0)
        m[0] = 0x5A
        dvm.set_user_memory_region2(1, 0, 0)
        dvm.set_user_memory_region2(1, GPA, M2, None, GMEM, g, 0)
        assert m[0] == 0x5A
