"""``Vm`` on the sim: unpacks the uapi structs ``api.Vm`` built into the model's ioctl-level operations.

Also the sim-only surface other layers use: ``handle_fault`` and ``add_zap_listener`` (the CPU contract,
see ``core/mmu.py``), ``introspect()``, and ``sim`` (the ``VmCore``).
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmgmem import uapi
from kvmgmem.api import Userspace, Vm
from kvmgmem.errors import KvmError
from kvmgmem.exits import HypercallExit
from kvmgmem.gmem_mapping import GmemMapping

from . import fdtable
from .core import hostmm
from .core.gmem import GmemFile, GmemInode
from .core.mmu import ZapListener
from .core.vm import VmCore
from .cpu import CpuSet
from .fault import FaultResult
from .gmem import SimGuestMemfd
from .mapping import SimMapper
from .storage import GmemStorage
from .vcpu import SimVcpu

if TYPE_CHECKING:
    from .system import SimSystem


def _close_vm(fd: int, core: VmCore, stores: _Stores, unpin_slots: Callable[[], None]) -> None:
    """Close the VM fd (``close()`` or a VM dropped without it): vCPUs go, memslots stop pinning host memory.

    Unpinning here matters for a VM that is only garbage collected: its memslots may pin a mapping of one of
    its own guest_memfds, and that mapping holds the file, the file holds the model VM, and the model VM's
    destroy listener holds the pins — a chain rooted in the finalizer registry that nothing else breaks."""
    cpus = stores.detach()
    if cpus is not None:
        cpus.close()
    unpin_slots()
    os.close(fd)
    core.put()


def _live_range(user: Userspace) -> tuple[int, int] | None:
    """The host range the sim can prove stays mapped while the slot pins it (None for a raw address)."""
    owner = user.owner
    if owner is None:
        return None
    mapper = getattr(owner, "_backend", None)
    if isinstance(owner, GmemMapping) and isinstance(mapper, SimMapper):
        # Only the part backed by the file's pages: private memory, and pages past EOF, SIGBUS on the host
        # (the kernel's hva fault fails there), so the sim's CPU must never reach them.
        live = mapper.live_bytes(owner)
        return (user.address, user.address + live) if live else None
    if user.pinnable:  # HostMemory, or a guest_memfd mapping: pinned while the slot uses it
        return user.address, user.address + owner.size
    with memoryview(owner) as view:
        return user.address, user.address + view.nbytes


class _Stores:
    """The host memory the VM's vCPUs may reach (memslot buffers, guest_memfd storage), refcounted by start
    address, and mirrored into the ``CpuSet`` once one exists: each store is mapped into unicorn once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stores: dict[int, list[int]] = {}  # host_ptr -> [size, references]
        self.cpus: CpuSet | None = None

    def get(self, host_ptr: int, size: int) -> None:
        with self._lock:
            entry = self._stores.get(host_ptr)
            if entry is not None and entry[0] >= size:
                entry[1] += 1
                return
            if entry is not None:  # the same start, now larger: remap with the larger size
                self._stores[host_ptr] = [size, entry[1] + 1]
                if self.cpus is not None:
                    self.cpus.remove_store(host_ptr)
            else:
                self._stores[host_ptr] = [size, 1]
            if self.cpus is not None:
                self.cpus.add_store(host_ptr, size)

    def put(self, host_ptr: int) -> None:
        with self._lock:
            entry = self._stores.get(host_ptr)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._stores[host_ptr]
            if self.cpus is not None:
                self.cpus.remove_store(host_ptr)

    def attach(self, cpus: CpuSet) -> None:
        with self._lock:
            self.cpus = cpus
            for host_ptr, (size, _refs) in self._stores.items():
                cpus.add_store(host_ptr, size)

    def detach(self) -> CpuSet | None:
        with self._lock:
            cpus, self.cpus = self.cpus, None
            return cpus


class _Resolver:
    """The CpuSet's ``GpaResolver``: ``handle_fault`` is the model's own ``Mmu.fault`` (what
    ``SimVm.handle_fault`` calls), stored as an instance attribute so that a TLB fill reaches the fault with
    no SimVm frame or weak proxy in between (each was a call per fault)."""

    __slots__ = ("_core", "handle_fault")

    def __init__(self, core: VmCore) -> None:
        self._core = core
        self.handle_fault = core.mmu.fault

    def emulate_hypercall(self, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallExit:
        return _emulate_hypercall(self._core, cpl, nr, a0, a1, a2, a3)


def _emulate_hypercall(core: VmCore, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallExit:
    """The model's ``kvm_emulate_hypercall`` (``VmCore.emulate_hypercall``); its exit becomes the API's exit."""
    answer = core.emulate_hypercall(cpl, nr, a0, a1, a2, a3)
    if isinstance(answer, int):
        return answer
    return HypercallExit(answer.nr, (*answer.args, 0, 0, 0), answer.long_mode)


class SimVm(Vm):
    def __init__(self, system: SimSystem, core: VmCore) -> None:
        super().__init__()
        self.system = system
        self.vm_type = core.vm_type
        #: The model's VM (``core/vm.py``: ``struct kvm``), as ``SimVcpu.sim`` and ``SimGuestMemfd.sim`` are theirs.
        self.sim = core
        self._fd = fdtable.placeholder_fd()
        stores = self._stores = _Stores()
        self._vcpu_lock = threading.Lock()  # kvm->lock: vCPU creation and KVM_CREATE_IRQCHIP
        # When the VM fd closes, or the model destroys the VM (possibly long after this fd closed, once the
        # last guest_memfd is gone), the memslots' host memory is unpinned. Neither may reference ``self``.
        users, lock, key = self._slot_users, self._slot_lock, id(self)

        def unpin_all() -> None:
            with lock:
                for slot, user in users.items():
                    user.unpin((key, slot))
                users.clear()

        self._finalizer = weakref.finalize(self, _close_vm, self._fd, core, stores, unpin_all)
        core.destroy_listeners.append(unpin_all)
        # vCPU execution: the CpuSet is created with the first vCPU (VMs without vCPUs never touch
        # unicorn); stores and zaps reach it through these listeners, which hold no reference to ``self``.
        self._slot_stores: dict[int, int] = {}  # memslot -> start of the store its userspace lies in

        def gmem_released(inode: GmemInode) -> None:
            base = getattr(inode.backing, "base", None)
            if base is not None:
                stores.put(base)
            for chunk in getattr(inode.backing, "chunks", list)():
                stores.put(chunk)

        def zapped(gfn_start: int, gfn_end: int) -> None:
            cpus = stores.cpus
            if cpus is not None:
                cpus.flush(gfn_start, gfn_end)

        core.add_gmem_release_listener(gmem_released)
        core.add_zap_listener(zapped)

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def irqchip(self) -> bool:
        """KVM_CREATE_IRQCHIP was done (``irqchip_in_kernel``; the model's ``X86Vm``)."""
        return self.sim.arch.irqchip_in_kernel

    def _release(self) -> None:
        """Close the VM fd: its vCPUs close with it and its memslots stop pinning host memory (as the kvm
        backend does; no vCPU is left to touch it). The model VM lives on while guest_memfds pin it."""
        for vcpu in self._vcpus:
            vcpu.close()
        cpus = self._stores.detach()
        if cpus is not None:
            cpus.close()
        self._finalizer()
        self._release_slots()

    # --- ioctls ---------------------------------------------------------------------------------------------

    def _check_extension(self, cap: int) -> int:
        return self.sim.check_extension(cap)

    def _create_guest_memfd(self, args: uapi.kvm_create_guest_memfd) -> SimGuestMemfd:
        op = "KVM_CREATE_GUEST_MEMFD"
        anonymous = not args.flags & uapi.GUEST_MEMFD_FLAG_INIT_SHARED  # no user mapping reaches it (storage.py)
        backing = functools.partial(GmemStorage, anonymous=anonymous)
        file = self.sim.create_guest_memfd(args.size, args.flags, backing)
        try:
            gmem = SimGuestMemfd(self, file)
        except OSError as e:
            file.put()
            raise KvmError(e.errno or errno.EMFILE, op, f"no fd for the guest_memfd: {e}") from e
        storage = file.inode.backing
        if isinstance(storage, GmemStorage):
            if storage.base is not None:
                self._stores.get(storage.base, file.inode.size)
            else:  # a file larger than the sim's whole-file view: its pieces become stores as they are mapped
                storage.chunk_listeners.append(self._stores.get)
        return gmem

    def _set_user_memory_region(self, region: uapi.kvm_userspace_memory_region, user: Userspace) -> None:
        # A v1 region has no guest_memfd fields; the kernel never reads them on this path (v1 refuses
        # KVM_MEM_GUEST_MEMFD first), so the model gets "no file" (fd -1) and offset 0.
        self._set_region(False, region, 0xFFFFFFFF, 0, user)

    def _set_user_memory_region2(self, region: uapi.kvm_userspace_memory_region2, user: Userspace) -> None:
        self._set_region(True, region, region.guest_memfd, region.guest_memfd_offset, user)

    def _set_region(
        self,
        v2: bool,
        region: uapi.kvm_userspace_memory_region | uapi.kvm_userspace_memory_region2,
        fd: int,
        offset: int,
        user: Userspace,
    ) -> None:
        slot, flags, size = region.slot, region.flags, region.memory_size
        live = _live_range(user) if size else None
        if live is not None:  # registered before the slot exists, so no vCPU can see an unknown store
            self._stores.get(live[0], live[1] - live[0])
        try:
            self.sim.set_user_memory_region(
                v2=v2,
                slot=slot,
                flags=flags,
                guest_phys_addr=region.guest_phys_addr,
                memory_size=size,
                userspace_addr=region.userspace_addr,
                guest_memfd=fd,
                guest_memfd_offset=offset,
                hva_live=live,
                fd_lookup=fdtable.lookup,
            )
        except BaseException:
            if live is not None:
                self._stores.put(live[0])
            raise
        if size and flags & uapi.KVM_MEM_GUEST_MEMFD:
            bound = fdtable.lookup(fd)
            if isinstance(bound, GmemFile) and isinstance(bound.inode.backing, GmemStorage):
                bound.inode.backing.premap(offset, size)
        previous = self._slot_stores.pop(slot, None)
        if live is not None:
            self._slot_stores[slot] = live[0]
        if previous is not None:
            self._stores.put(previous)

    def _set_memory_attributes(self, attrs: uapi.kvm_memory_attributes) -> None:
        self.sim.set_memory_attributes(attrs.address, attrs.size, attrs.attributes, attrs.flags)

    def _enable_cap(self, cap: uapi.kvm_enable_cap) -> None:
        self.sim.enable_cap(cap.cap, cap.flags, tuple(cap.args))

    def _create_irqchip(self) -> None:
        with self._vcpu_lock:
            self.sim.arch.create_irqchip(len(self.sim.vcpu_ids))  # kvm->created_vcpus, closed vCPUs included

    def _get_tsc_khz(self) -> int:
        return self.sim.profile.tsc_khz  # kvm->arch.default_tsc_khz (no KVM_SET_TSC_KHZ: the host's tsc_khz)

    def _set_nr_mmu_pages(self, pages: int) -> None:
        with self.sim.slots_lock:
            self.sim.arch.set_nr_mmu_pages(pages)

    def _create_vcpu(self, vcpu_id: int) -> SimVcpu:
        with self._vcpu_lock:
            self.sim.create_vcpu(vcpu_id)  # the limits, and EEXIST for an id already used
            try:
                vcpu = SimVcpu(self, vcpu_id, self._cpuset())
            except BaseException:
                self.sim.create_vcpu_failed(vcpu_id)
                raise
            self._vcpus.append(vcpu)
            return vcpu

    def _cpuset(self) -> CpuSet:
        """The VM's CpuSet, created with the first vCPU (caller holds ``_vcpu_lock``)."""
        cpus = self._stores.cpus
        if cpus is None:
            # The resolver holds the model, not this VM: the core's zap listener reaches the CpuSet, which must
            # not keep this VM alive (a VM dropped without close() is then collected, and its finalizer closes
            # the CpuSet).
            cpus = CpuSet(_Resolver(self.sim), self.private_access_bit)
            self._stores.attach(cpus)
        return cpus

    # --- sim-only surface -----------------------------------------------------------------------------------

    def handle_fault(
        self, gpa: int, write: bool = False, fetch: bool = False, private: bool | None = None
    ) -> FaultResult:
        """The CPU's fault entry point (``cpu.types.GpaResolver``; contract in ``core/mmu.py``): the model's
        result, as it made it (``fault.py``). ``private`` None derives the access type from the attribute;
        True/False is what the vCPU's private access bit reported (a mismatch is a memory-fault exit)."""
        return self.sim.mmu.fault(gpa, write, fetch, private)

    def emulate_hypercall(self, cpl: int, nr: int, a0: int, a1: int, a2: int, a3: int) -> int | HypercallExit:
        """The CPU's hypercall entry point (``cpu.types.GpaResolver``): the model's ``kvm_emulate_hypercall``."""
        return _emulate_hypercall(self.sim, cpl, nr, a0, a1, a2, a3)

    def _private_access_bit(self) -> int | None:
        """The profile's ``private_access_bit`` if this VM's vCPUs honour it (KVM_X86_SW_PROTECTED_VM only)."""
        if self.vm_type != uapi.KVM_X86_SW_PROTECTED_VM:
            return None
        return self.sim.profile.private_access_bit

    def mmu_notifier_invalidate(self, hva_start: int, hva_end: int, unmap: bool) -> None:
        """The host is about to discard (``unmap=False``, ``MADV_DONTNEED``) or unmap (``munmap``) the pages of
        ``[hva_start, hva_end)``: the memslots' SPTEs there are zapped, and an unmap takes the range out of what
        the slots may reach (``core/hostmm.py``)."""
        hostmm.mmu_notifier_invalidate(self.sim, hva_start, hva_end, unmap)

    def add_zap_listener(self, callback: ZapListener) -> None:
        self.sim.add_zap_listener(callback)

    def remove_zap_listener(self, callback: ZapListener) -> None:
        self.sim.remove_zap_listener(callback)

    def _introspect(self) -> dict[str, Any]:
        """SPTEs, attribute ranges, memslots, guest_memfd page states and counters (``VmCore.introspect``)."""
        return self.sim.introspect()
