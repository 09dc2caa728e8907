"""The sim's KVM_PRE_FAULT_MEMORY (``core/prefault.py``): profiles, huge mappings, the memslot race, kicks."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends.sim import SimSystem, SimVm

from .conftest import GMEM, M2, PRIVATE, P

GPA = 1 << 32


def test_profile_6_8_has_no_ioctl(open_sim: Callable[..., SimSystem]) -> None:
    """Before 6.10 the ioctl is unknown: x86's `kvm_arch_vcpu_ioctl` answers EINVAL, and the cap is 0."""
    s = open_sim("6.8")
    assert s.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0
    with s.create_vm() as vm, vm.create_vcpu() as vcpu:
        with pytest.raises(KvmError) as info:
            vcpu.pre_fault_memory(0, P)
        assert info.value.errno == errno.EINVAL


def test_profile_host_is_shadow_paging(
    open_sim: Callable[..., SimSystem], hostmem: Callable[[int], HostMemory]
) -> None:
    """Profile "host" mirrors this host's shadow paging: cap 0 (`r = tdp_enabled`) and EOPNOTSUPP for a valid
    call (`kvm_tdp_page_prefault`), after the argument checks (EINVAL first)."""
    s = open_sim("host")
    assert s.check_extension(uapi.KVM_CAP_PRE_FAULT_MEMORY) == 0
    with s.create_vm() as vm, vm.create_vcpu() as vcpu:
        vm.set_user_memory_region(0, GPA, M2, hostmem(M2))
        for args, err in (((GPA, P, 1), errno.EINVAL), ((GPA, P, 0), errno.EOPNOTSUPP)):
            with pytest.raises(KvmError) as info:
                vcpu.pre_fault_memory(*args)
            assert info.value.errno == err


def test_huge_mapping_advances_to_its_end(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """One fault can map 2 MiB (a THP-backed hva): `kvm_arch_vcpu_pre_fault_memory` returns up to the mapping's
    end, so the range advances past pages it never faulted one by one, and the SPTE is a 2 MiB one."""
    dvm.set_user_memory_region(0, GPA, 2 * M2, hostmem(2 * M2))
    with dvm.create_vcpu() as vcpu:
        assert vcpu.pre_fault_memory(GPA + P, 3 * M2 // 2) == (GPA + P + 3 * M2 // 2, 0)
        before = dvm.introspect()["counters"]["faults"]
        assert vcpu.pre_fault_memory(GPA, 2 * M2) == (GPA + 2 * M2, 0)
        assert dvm.introspect()["counters"]["faults"] - before == 2  # one per 2 MiB mapping
    levels = {s["level"] for s in dvm.introspect()["sptes"]}
    assert levels == {2}


def test_private_pages_come_from_guest_memfd(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """Private pages are faulted from the guest_memfd (allocating them), shared ones from the hva."""
    with pvm.create_guest_memfd(M2) as g:
        pvm.set_user_memory_region2(10, GPA, M2, hostmem(M2), GMEM, g, 0)
        pvm.set_memory_attributes(GPA, 2 * P, PRIVATE)
        with pvm.create_vcpu() as vcpu:
            assert vcpu.pre_fault_memory(GPA, 4 * P) == (GPA + 4 * P, 0)
        assert g.allocated_bytes() == 2 * P
        backing = {s["gfn"] << 12: s["backing"] for s in pvm.introspect()["sptes"]}
        assert backing == {GPA: "gmem", GPA + P: "gmem", GPA + 2 * P: "hva", GPA + 3 * P: "hva"}
        pvm.set_user_memory_region2(10, GPA, 0)


def test_invalid_slot_is_eagain(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """A memslot published INVALID (being deleted or moved) fails a prefault with EAGAIN instead of the retry
    KVM_RUN would do (`kvm_mmu_faultin_pfn`: `if (fault->prefetch) return -EAGAIN`)."""
    dvm.set_user_memory_region(10, GPA, M2, hostmem(M2))
    slot = dvm.sim.memslots[0].get(10)
    assert slot is not None
    with dvm.create_vcpu() as vcpu:
        slot.invalid = True
        try:
            with pytest.raises(KvmError) as info:
                vcpu.pre_fault_memory(GPA, P)
            assert info.value.errno == errno.EAGAIN
        finally:
            slot.invalid = False
        assert vcpu.pre_fault_memory(GPA, P) == (GPA + P, 0)
    dvm.set_user_memory_region(10, GPA, 0)


def test_kick_eintr_then_run_still_interrupted(dvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """A kick is immediate_exit plus a signal: the prefault consumes the signal (EINTR, nothing mapped) but
    immediate_exit stays set, so the next KVM_RUN still returns EINTR; after that both are clear."""
    dvm.set_user_memory_region(0, GPA, M2, hostmem(M2))
    with dvm.create_vcpu() as vcpu:
        vcpu.kick()
        with pytest.raises(KvmError) as info:
            vcpu.pre_fault_memory(GPA, P)
        assert info.value.errno == errno.EINTR
        assert vcpu.pre_fault_memory(GPA, P) == (GPA + P, 0)
        with pytest.raises(KvmError) as info:
            vcpu.run()
        assert info.value.errno == errno.EINTR
        assert vcpu.pre_fault_memory(GPA + P, P) == (GPA + 2 * P, 0)
    dvm.set_user_memory_region(0, GPA, 0)


@pytest.mark.parametrize("private", [False, True], ids=["shared", "private"])
def test_racing_memslot_deletion(make_vm: Callable[..., SimVm], hostmem: Callable[[int], HostMemory],
                                 private: bool) -> None:  # fmt: skip
    """pre_fault_memory_test's race, many times: another thread deletes and recreates the slot while the vCPU
    prefaults 2 MiB + 4 KiB page by page. Every call either advances the range (success) or fails with it
    unchanged; failures are only those the ABI allows for a vanished slot (ENOENT, EAGAIN, EFAULT for a
    private page), and once the slot is back the loop completes with nothing left."""
    vm = make_vm(uapi.KVM_X86_SW_PROTECTED_VM)
    size = M2 + P
    mem = hostmem(2 * M2)
    gmems = []

    def add_slot() -> None:
        if private:
            g = vm.create_guest_memfd(size)
            gmems.append(g)
            vm.set_user_memory_region2(10, GPA, size, mem, GMEM, g, 0)
        else:
            vm.set_user_memory_region(10, GPA, size, mem)

    add_slot()
    if private:
        vm.set_memory_attributes(GPA, size, PRIVATE)
    with vm.create_vcpu() as vcpu:
        for _ in range(20):
            deleted, recreate = threading.Event(), threading.Event()

            def worker(deleted: threading.Event, recreate: threading.Event) -> None:
                vm.set_user_memory_region(10, GPA, 0)
                deleted.set()
                recreate.wait()
                add_slot()

            gpa, left = GPA, size
            t = threading.Thread(target=worker, args=(deleted, recreate))
            t.start()
            recreated = False
            while left:
                try:
                    new_gpa, new_left = vcpu.pre_fault_memory(gpa, left)
                    assert new_left < left and new_gpa - gpa == left - new_left
                    gpa, left = new_gpa, new_left
                except KvmError as e:
                    assert e.errno in (errno.ENOENT, errno.EAGAIN, errno.EFAULT), e
                    assert recreated is False, f"failed after the slot was recreated: {e}"
                if not recreated:
                    deleted.wait()
                    recreate.set()
                    t.join()
                    recreated = True
            if not recreated:
                recreate.set()
                t.join()
            vm.set_user_memory_region(10, GPA, 0)
            add_slot()
    vm.set_user_memory_region(10, GPA, 0)
    for g in gmems:
        g.close()
