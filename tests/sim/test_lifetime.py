"""Object lifetimes on the sim (virt/kvm/guest_memfd.c: `kvm_gmem_release`, `kvm_gmem_unbind`, the VM reference a
guest_memfd holds; memslots do not pin the file) and concurrent faults vs invalidations
(`kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end`)."""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable

import pytest

from kvmgmem import HostMemory, KvmError
from kvmgmem.backends.sim import SimSystem, SimVm
from kvmgmem.backends.sim.fault import Mapped

from .conftest import GMEM, MMAP, PRIVATE, P

GPA = 0xC0000000


def test_2_14_gmem_pins_vm(simsys: SimSystem) -> None:
    """the guest_memfd's VM reference (`kvm_gmem_create`): closing the VM fd keeps the VM alive while a guest_memfd
    exists; allocate/punch still work; closing the gmem then destroys the VM."""
    vm = simsys.create_vm(1)
    core = vm.sim
    g = vm.create_guest_memfd(4 * P)
    vm.set_user_memory_region2(10, GPA, 4 * P, None, GMEM, g, 0)
    vm.close()
    assert not core.destroyed and core.refs == 1
    g.allocate(0, 4 * P)
    g.punch_hole(0, 4 * P)
    g.allocate(0, 4 * P)
    g.close()
    assert core.destroyed and core.refs == 0
    assert len(core.memslots[0]) == 0


def test_2_12_memslots_do_not_pin_gmem(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_gmem_release`: a bound memslot does not keep the gmem alive: closing it releases the file (slot keeps its
    GUEST_MEMFD flag, loses the file pointer, its SPTEs are zapped) and frees the inode's pages."""
    g = pvm.create_guest_memfd(4 * P)
    pvm.set_user_memory_region2(10, GPA, 4 * P, hostmem(4 * P), GMEM, g, 0)
    pvm.set_memory_attributes(GPA, 4 * P, PRIVATE)
    assert isinstance(pvm.sim.handle_fault(GPA), Mapped)
    file = g.sim
    g.close()
    assert file.released and not file.inode.alive
    assert file.inode.pages_allocated == file.inode.pages_freed == 1
    slot = pvm.sim.memslots[0].get(10)
    assert slot is not None and slot.gmem is None and slot.can_be_private
    assert pvm.introspect()["sptes"] == []
    pvm.set_user_memory_region2(10, GPA, 0)  # unbind is a no-op


def test_2_1_vcpu_pins_vm(simsys: SimSystem) -> None:
    """`kvm_vm_ioctl_create_vcpu`: a vCPU fd holds a VM reference; regs/sregs are stored; vCPU ids are unique
    (EEXIST)."""
    vm = simsys.create_vm()
    core = vm.sim
    vcpu = vm.create_vcpu(0)
    with pytest.raises(KvmError):
        vm.create_vcpu(0)
    regs = vcpu.get_regs()
    regs.rax = 42
    vcpu.set_regs(regs)
    assert vcpu.get_regs().rax == 42 and vcpu.get_sregs().cs.selector == 0xF000
    assert core.refs == 2
    vm.close()  # closes its vCPUs too (as the kvm backend does)
    assert vcpu.closed and core.destroyed


def test_gc_releases_everything(simsys: SimSystem) -> None:
    """Objects dropped without close() are released by their finalizers (fds, storage, VM)."""
    vm = simsys.create_vm()
    core = vm.sim
    g = vm.create_guest_memfd(4 * P, MMAP)
    m = g.mmap()
    file = g.sim
    del vm, g, m
    gc.collect()
    assert file.released and not file.inode.alive and core.destroyed


def test_3_5_concurrent_faults_never_map_stale(pvm: SimVm, hostmem: Callable[[int], HostMemory]) -> None:
    """`kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end`: a vCPU thread faulting while another thread converts and
    punches never installs an SPTE that the current state forbids (checked after every conversion under the MMU lock).
    Whether a fault races an invalidation here is up to the scheduler, so retries are not counted; ``test_mmu`` forces
    one."""
    n = 64
    mem = hostmem(n * P)
    g = pvm.create_guest_memfd(n * P)
    pvm.set_user_memory_region2(10, GPA, n * P, mem, GMEM, g, 0)
    core = pvm.sim
    stop = threading.Event()
    faulting = threading.Event()  # the conversions start only once the vCPU thread is faulting
    errors: list[BaseException] = []

    def vcpu() -> None:
        i = 0
        try:
            while not stop.is_set():
                r = core.handle_fault(GPA + (i % n) * P, write=bool(i & 1))
                if isinstance(r, Mapped):
                    ctypes.string_at(r.host_ptr, 1)
                i += 1
                faulting.set()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def check() -> None:
        with core.mmu.lock:
            for s in core.mmu.sptes():
                assert core.attributes.has(s.gfn, s.gfn + s.npages, PRIVATE if s.gmem is not None else 0)
                if s.gmem is not None:
                    idx = s.slot.gmem_index(s.gfn)
                    assert s.gmem.pages.is_uniform(idx, idx + s.npages, 1)

    slow = [0]
    pvm.add_zap_listener(lambda lo, hi: slow.__setitem__(0, slow[0] + sum(range(2000))))  # widen the window
    t = threading.Thread(target=vcpu)
    t.start()
    try:
        assert faulting.wait(30), "the vCPU thread never faulted"
        for k in range(300):
            lo = (k * 7) % n
            pvm.set_memory_attributes(GPA + lo * P, 8 * P, PRIVATE if k % 2 == 0 else 0)
            check()
            if k % 3 == 0:
                g.punch_hole(lo * P, 4 * P)
                check()
    finally:
        stop.set()
        t.join()
        g.close()
    assert not errors
    assert core.mmu.in_progress == 0
