"""Random operation sequences against the sim's model, checking the kernel's invariants after every step.

Invariants (docs/reliability.md; `kvm_mmu_invalidate_begin`/`kvm_mmu_invalidate_end`, `kvm_gmem_release`,
`kvm_gmem_unbind`, the VM reference a guest_memfd holds):
- no SPTE maps a backing that the current attributes, bindings or punched/poisoned pages forbid, and every
  SPTE agrees with the memslot that covers it (address, level alignment, huge only where uniform);
- SPTEs never overlap, no invalidation is left in progress;
- page accounting balances (allocated − freed = present) for every live inode;
- the stored "mixed" huge-page flags equal a recomputation from the attributes (`hugepage_has_attrs`);
- lifetimes: guest_memfd files pin the VM; memslots do not pin guest_memfd files; the VM's refcount is its
  fd + vCPUs + unreleased files.
"""

from __future__ import annotations

import ctypes
import errno
import signal
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvmgmem import HostMemory, KvmError, uapi
from kvmgmem.backends import sim
from kvmgmem.backends.sim import SIM_GUEST_MEMFD_FLAG_HUGEPAGE, SimGuestMemfd, SimSystem, SimVm
from kvmgmem.backends.sim.core.gmem import PAGE_PRESENT
from kvmgmem.backends.sim.core.memslots import HUGE_LEVELS
from kvmgmem.backends.sim.core.profile import level_pages
from kvmgmem.backends.sim.fault import Mapped, MemoryFault, Mmio, Retry
from kvmgmem.conformance._sigbus import touch_dies_of_sigbus

P = uapi.PAGE_SIZE
GMEM = uapi.KVM_MEM_GUEST_MEMFD
PRIVATE = uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
NPAGES = 1024  # guest-physical universe: gfns [0, 1024) = 4 MiB, two 2 MiB regions
GMEM_PAGES = 1024
BASES = st.sampled_from([0, 64, 256, 448, 512, 768, 960])
SIZES = st.sampled_from([64, 128, 512])
STEPS = {"n": 0}


class SimModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.system: SimSystem | None = None
        self.vm: SimVm | None = None
        self.gmems: list[SimGuestMemfd] = []
        self.mappings: list[object] = []
        self.released_files: list[object] = []

    @initialize(
        vm_type=st.sampled_from([uapi.KVM_X86_DEFAULT_VM, uapi.KVM_X86_SW_PROTECTED_VM]),
        profile=st.sampled_from(["6.18", "6.18", "7.2", "6.8"]),
        hugepage=st.booleans(),
    )
    def setup(self, vm_type: int, profile: str, hugepage: bool) -> None:
        if profile == "6.8":
            vm_type = uapi.KVM_X86_SW_PROTECTED_VM  # 6.8 has gmem slots only on private VMs
        self.vm_type = vm_type
        self.system = sim.open_system(profile, hugepage=hugepage)
        self.vm = self.system.create_vm(vm_type)
        self.core = self.vm.sim
        self.mem = HostMemory((NPAGES * P) + (2 << 20))
        self.window = self.mem.address + (-self.mem.address % (2 << 20))
        self.offset_in_mem = self.window - self.mem.address

    def teardown(self) -> None:
        for m in self.mappings:
            m.close()  # type: ignore[attr-defined]
        for g in self.gmems:
            g.close()
        if self.vm is not None:
            self.vm.close()
            assert self.core.destroyed, "VM must be destroyed once its fd and every guest_memfd are gone"
        if self.system is not None:
            self.system.close()
            self.mem.close()

    def step(self) -> None:
        STEPS["n"] += 1

    # --- rules --------------------------------------------------------------------------------------------

    @precondition(
        lambda self: self.vm is not None and not self.vm.closed and len([g for g in self.gmems if not g.closed]) < 3
    )
    @rule(mmap=st.booleans(), huge=st.booleans())
    def create_gmem(self, mmap: bool, huge: bool) -> None:
        self.step()
        assert self.vm is not None
        valid = self.vm.check_extension(uapi.KVM_CAP_GUEST_MEMFD_FLAGS)
        flags = (uapi.GUEST_MEMFD_FLAG_MMAP | uapi.GUEST_MEMFD_FLAG_INIT_SHARED) & valid if mmap else 0
        if huge and valid & SIM_GUEST_MEMFD_FLAG_HUGEPAGE:
            flags |= SIM_GUEST_MEMFD_FLAG_HUGEPAGE
        self.gmems.append(self.vm.create_guest_memfd(GMEM_PAGES * P, flags))

    @precondition(lambda self: any(not g.closed for g in self.gmems))
    @rule(data=st.data())
    def close_gmem(self, data: st.DataObject) -> None:
        """`kvm_gmem_release`: memslots do not pin the file; bound slots lose their file pointer."""
        self.step()
        g = data.draw(st.sampled_from([g for g in self.gmems if not g.closed]))
        file = g.sim
        g.close()
        if file.refs == 0:
            assert file.released
            assert all(s.gmem is not file for space in self.core.memslots for s in space)
            self.released_files.append(file)

    @precondition(lambda self: self.vm is not None and not self.vm.closed)
    @rule(slot=st.integers(0, 3), base=BASES, npages=SIZES, use_gmem=st.booleans(), data=st.data())
    def set_slot(self, slot: int, base: int, npages: int, use_gmem: bool, data: st.DataObject) -> None:
        self.step()
        assert self.vm is not None
        npages = min(npages, NPAGES - base)
        hva = memoryview(self.mem)[self.offset_in_mem + base * P : self.offset_in_mem + (base + npages) * P]
        gmems = [g for g in self.gmems if not g.closed]
        try:
            if use_gmem and gmems:
                g = data.draw(st.sampled_from(gmems))
                off = data.draw(st.sampled_from([0, 64, 512, 960])) * P
                self.vm.set_user_memory_region2(slot, base * P, npages * P, hva, GMEM, g, off)
            else:
                self.vm.set_user_memory_region(slot, base * P, npages * P, hva)
        except KvmError as e:
            assert e.errno in (errno.EINVAL, errno.EEXIST), e
            if e.errno == errno.EEXIST and not use_gmem:
                clash = self.core.memslots[0].overlapping(base, base + npages)
                assert clash and any(s.id != slot for s in clash)

    @precondition(lambda self: self.vm is not None and not self.vm.closed)
    @rule(slot=st.integers(0, 3))
    def delete_slot(self, slot: int) -> None:
        self.step()
        assert self.vm is not None
        exists = self.core.memslots[0].get(slot) is not None
        try:
            self.vm.set_user_memory_region2(slot, 0, 0)
            assert exists
        except KvmError as e:
            assert e.errno == errno.EINVAL and not exists

    @precondition(lambda self: self.vm is not None and not self.vm.closed and self.core.has_private_mem)
    @rule(start=st.integers(0, NPAGES - 1), n=st.sampled_from([1, 2, 7, 64, 512, 1024]), private=st.booleans())
    def set_attributes(self, start: int, n: int, private: bool) -> None:
        self.step()
        assert self.vm is not None
        self.vm.set_memory_attributes(start * P, n * P, PRIVATE if private else 0)
        assert self.core.attributes.has(start, start + n, PRIVATE if private else 0)

    @precondition(lambda self: any(not g.closed for g in self.gmems))
    @rule(data=st.data(), start=st.integers(0, GMEM_PAGES - 1), n=st.sampled_from([1, 3, 64, 600]), punch=st.booleans())
    def fallocate(self, data: st.DataObject, start: int, n: int, punch: bool) -> None:
        self.step()
        g = data.draw(st.sampled_from([g for g in self.gmems if not g.closed]))
        if punch:
            g.punch_hole(start * P, n * P)
            assert g.sim.inode.pages.is_uniform(start, min(start + n, GMEM_PAGES), 0)
        elif start + n <= GMEM_PAGES:
            g.allocate(start * P, n * P)
        else:
            with pytest.raises(KvmError):
                g.allocate(start * P, n * P)

    @precondition(lambda self: any(not g.closed for g in self.gmems))
    @rule(data=st.data(), page=st.integers(0, GMEM_PAGES - 1))
    def poison(self, data: st.DataObject, page: int) -> None:
        self.step()
        g = data.draw(st.sampled_from([g for g in self.gmems if not g.closed]))
        g.inject_poison(page * P)

    @precondition(lambda self: self.vm is not None and not self.vm.closed)
    @rule(data=st.data(), n=st.integers(1, 8))
    def faults(self, data: st.DataObject, n: int) -> None:
        """A burst of vCPU accesses, mostly inside memslots."""
        self.step()
        for _ in range(n):
            slots = list(self.core.memslots[0])
            if slots and data.draw(st.integers(0, 9)):
                slot = data.draw(st.sampled_from(slots))
                gfn = data.draw(st.integers(slot.base_gfn, slot.end_gfn - 1))
            else:
                gfn = data.draw(st.integers(0, NPAGES + 8))
            self.fault(gfn, data.draw(st.booleans()), data.draw(st.integers(0, P - 1)))

    def fault(self, gfn: int, write: bool, byte: int) -> None:
        """One access: on a mapping, the byte is read or written through the returned host address."""
        gpa = gfn * P + byte
        r = self.core.handle_fault(gpa, write)
        if isinstance(r, Mapped):
            addr = r.host_address_of(gpa)
            assert r.gpa <= gpa < r.gpa + r.size
            if write:
                ctypes.memmove(addr, b"\x5a", 1)
            else:
                ctypes.string_at(addr, 1)
        elif isinstance(r, MemoryFault):
            assert r.gpa == gfn * P and r.size == P and r.errno in (errno.EFAULT, uapi.EHWPOISON, errno.EIO)
            assert bool(r.flags & uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE) == self.core.attributes.is_private(gfn)
        elif isinstance(r, Mmio):
            assert self.core.memslots[0].lookup(gfn) is None and not self.core.attributes.is_private(gfn)
        else:
            assert not isinstance(r, Retry), "nothing is being invalidated between steps"

    @precondition(lambda self: any(not g.closed and g.flags & uapi.GUEST_MEMFD_FLAG_MMAP for g in self.gmems))
    @rule(data=st.data(), page=st.integers(0, GMEM_PAGES + 4))
    def host_access(self, data: st.DataObject, page: int) -> None:
        """`kvm_gmem_mmap`/`kvm_gmem_fault_user_mapping`: host access through an mmap: a real SIGBUS (in a forked child)
        beyond EOF, on private files, on poison; elsewhere the write lands and the page is present."""
        self.step()
        g = data.draw(st.sampled_from([g for g in self.gmems if not g.closed and g.flags & uapi.GUEST_MEMFD_FLAG_MMAP]))
        m = g.mmap((GMEM_PAGES + 8) * P)
        inode = g.sim.inode
        if page < GMEM_PAGES and inode.init_shared and inode.state(page) != 2:
            m[page * P] = 1
            g.allocated_bytes()  # takes in what host accesses touched
            assert inode.state(page) == PAGE_PRESENT
        else:
            assert touch_dies_of_sigbus(m.address + page * P, 1, write=True) == signal.SIGBUS
        if data.draw(st.booleans()):
            self.mappings.append(m)  # keep it: it pins the file past close (`kvm_gmem_mmap`)
        else:
            m.close()

    @precondition(lambda self: self.vm is not None and not self.vm.closed)
    @rule(dice=st.integers(0, 29))
    def close_vm(self, dice: int) -> None:
        """the guest_memfd's VM reference (`kvm_gmem_create`): closing the VM fd keeps the VM alive while a guest_memfd
        exists; fallocate keeps working. (Rare: after it only guest_memfd operations remain.)"""
        self.step()
        if dice:
            return
        assert self.vm is not None
        self.vm.close()
        live = [g for g in self.gmems if not g.closed]
        assert self.core.destroyed == (not live and not any(not m.closed for m in self.mappings))  # type: ignore[attr-defined]
        for g in live:
            g.punch_hole(0, P)
            g.allocate(0, P)

    @precondition(lambda self: self.vm is not None and self.vm.closed)
    @rule()
    def new_vm(self) -> None:
        """After the VM fd closed: drop every guest_memfd and mapping (the VM must then be destroyed, its
        pages all freed) and start over with a fresh VM."""
        self.step()
        assert self.system is not None
        for m in self.mappings:
            m.close()  # type: ignore[attr-defined]
        for g in self.gmems:
            g.close()
        assert self.core.destroyed and self.core.refs == 0
        assert all(f.inode.pages_allocated == f.inode.pages_freed for f in self.released_files)  # type: ignore[attr-defined]
        self.gmems, self.mappings, self.released_files = [], [], []
        self.vm = self.system.create_vm(self.vm_type)
        self.core = self.vm.sim

    # --- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def sptes_respect_state(self) -> None:
        if self.vm is None:
            return
        core = self.core
        mmu = core.mmu
        assert mmu.in_progress == 0 and not mmu.ranges
        prev_end = -1
        for s in mmu.sptes():
            n = level_pages(s.level)
            assert s.gfn % n == 0 and s.gfn >= prev_end, "SPTEs aligned and non-overlapping"
            prev_end = s.gfn + n
            slot = core.memslots[0].lookup(s.gfn)
            assert slot is s.slot and not slot.invalid and s.gfn + n <= slot.end_gfn
            attrs = core.attributes
            if s.gmem is not None:
                file = slot.gmem
                assert file is not None and not file.released and file.inode is s.gmem and s.gmem.alive
                idx = slot.gmem_index(s.gfn)
                assert s.pgoff == idx and s.host_address == s.gmem.backing.address(idx)
                assert file.bindings.is_uniform(idx, idx + n) and file.bindings.get(idx) is slot
                assert s.gmem.pages.is_uniform(idx, idx + n, PAGE_PRESENT), "punched/poisoned page mapped"
                assert attrs.has(s.gfn, s.gfn + n, PRIVATE if s.private else 0)
                assert s.private or slot.gmem_only
                if n > 1:
                    assert s.gmem.hugepage
            else:
                assert not slot.gmem_only and attrs.has(s.gfn, s.gfn + n, 0), "shared SPTE over private gfns"
                assert s.host_address == slot.hva(s.gfn) and slot.hva_ok(s.host_address, n * P)
                assert not (n > 1 and slot.dirty_logging)

    @invariant()
    def accounting_and_mixed(self) -> None:
        if self.vm is None:
            return
        core = self.core
        for f in core.gmem_files:
            inode = f.inode
            assert inode.pages_allocated - inode.pages_freed == inode.nr_present
        for f in self.released_files:
            inode = f.inode  # type: ignore[attr-defined]
            assert not inode.alive and inode.pages_allocated == inode.pages_freed
        for space in core.memslots:
            for slot in space:
                for level in HUGE_LEVELS:
                    n = level_pages(level)
                    for r in range(-(-slot.base_gfn // n), slot.end_gfn // n):
                        assert slot.mixed[level].get(r) == (not core.attributes.is_uniform(r * n, (r + 1) * n))

    @invariant()
    def lifetimes(self) -> None:
        if self.vm is None:
            return
        core = self.core
        files = [f for f in core.gmem_files if not f.released]
        assert files == core.gmem_files
        vcpus = 0
        assert core.refs == (0 if self.vm.closed else 1) + vcpus + len(files) or core.destroyed
        if files:
            assert not core.destroyed, "a guest_memfd pins its VM"
        for f in files:
            assert f.vm is core and f.inode.alive


def test_stateful_invariants_10k_steps() -> None:
    """≥10,000 random steps over many examples, all invariants checked after each step."""
    STEPS["n"] = 0
    start = time.monotonic()
    run_state_machine_as_test(
        SimModel,
        settings=settings(
            max_examples=400,
            stateful_step_count=60,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
    elapsed = time.monotonic() - start
    assert STEPS["n"] >= 10_000, f"only {STEPS['n']} steps ran"
    assert elapsed < 90, f"{STEPS['n']} steps took {elapsed:.1f} s"
