"""The sim's kernel-side model: a pure state machine (no unicorn, no threads, no I/O).

Modules, one job each: ``rangemap`` (runs of per-index values), ``profile`` (kernel version + host config),
``caps`` (KVM_CHECK_EXTENSION), ``attributes`` (gfn → attributes), ``gmem`` (guest_memfd inode and file),
``memslots`` (memslot tables and REGION checks), ``lpage`` (huge-page "mixed" tracking), ``spte_map`` (the
SPTEs), ``fault_path`` (the page fault), ``mmu`` (mmu_lock, the invalidation protocol; the CPU contract),
``memslot_ops``, ``attribute_ops``, ``gmem_ops`` and ``mmu_notifier`` (the ioctl-level and file operations as
kernel steps, in the kernel's order), ``vm`` (struct kvm: the state and the facade over those), ``introspect``
(a snapshot for tests and tools), ``x86_vm`` (``kvm->arch``: irqchip, MMU pages), ``vcpu`` (one vCPU's RESET state,
CPUID, mp_state and KVM_RUN rules), ``cpuid`` (the supported table and KVM_SET_CPUID2's checks), ``hostmm``
(madvise, munmap and memory failure from the host's side). A fault's result types live one level up, in
``backends/sim/fault.py``, because the CPU layer (which may not import the core) consumes them too.
"""

from __future__ import annotations

from .gmem import GmemFile, GmemInode, NullBacking
from .profile import PROFILES, SIM_GUEST_MEMFD_FLAG_HUGEPAGE, Profile, get_profile
from .spte_map import Spte
from .vm import Fd, VmCore, create_vm

__all__ = [
    "PROFILES",
    "SIM_GUEST_MEMFD_FLAG_HUGEPAGE",
    "Fd",
    "GmemFile",
    "GmemInode",
    "NullBacking",
    "Profile",
    "Spte",
    "VmCore",
    "create_vm",
    "get_profile",
]
