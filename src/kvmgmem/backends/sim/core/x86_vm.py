"""The VM-wide x86 set-up state (``kvm->arch``) and the rules of the ioctls that change it.

Why a module of its own: KVM_CREATE_IRQCHIP and KVM_SET_NR_MMU_PAGES (``kvm_arch_vm_ioctl``) change nothing the
memory model reads — the sim models no PIC, IOAPIC or local APIC, and its TDP MMU has no shadow-page pool — but
their errnos and what they record are the kernel's, and the irqchip decides how each new vCPU starts
(``VcpuCore``). ``VmCore.arch`` holds one of these.
"""

from __future__ import annotations

import errno

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .vcpu import VcpuCore


class X86Vm:
    """``kvm->arch``'s irqchip mode and requested shadow-MMU pages."""

    def __init__(self) -> None:
        #: KVM_CREATE_IRQCHIP was done (``irqchip_in_kernel``); only the mode, no interrupt controller is modelled.
        self.irqchip_in_kernel = False
        #: KVM_SET_NR_MMU_PAGES' last value (``n_requested_mmu_pages``; 0: never set), unused by the sim's TDP MMU.
        self.n_requested_mmu_pages = 0

    def create_irqchip(self, created_vcpus: int) -> None:
        """``kvm_arch_vm_ioctl`` KVM_CREATE_IRQCHIP (the caller holds kvm->lock, which vCPU creation takes too):
        EEXIST when the VM already has one, EINVAL once ``created_vcpus`` (every vCPU ever created, closed ones
        included) is not 0."""
        op = "KVM_CREATE_IRQCHIP"
        if self.irqchip_in_kernel:
            raise KvmError(errno.EEXIST, op, "the VM already has an in-kernel irqchip")
        if created_vcpus:
            raise KvmError(errno.EINVAL, op, "vCPUs were already created")
        self.irqchip_in_kernel = True

    def set_nr_mmu_pages(self, pages: int) -> None:
        """``kvm_vm_ioctl_set_nr_mmu_pages``: fewer than KVM_MIN_ALLOC_MMU_PAGES is EINVAL; else the value is
        recorded (the caller holds slots_lock)."""
        if pages < uapi.KVM_MIN_ALLOC_MMU_PAGES:
            raise KvmError(errno.EINVAL, "KVM_SET_NR_MMU_PAGES", f"{pages} < KVM_MIN_ALLOC_MMU_PAGES (64)")
        self.n_requested_mmu_pages = pages

    def vcpu_create(self, vcpu_id: int) -> VcpuCore:
        """``kvm_arch_vcpu_create``'s state for vCPU ``vcpu_id``: a local APIC comes with the in-kernel irqchip."""
        return VcpuCore(vcpu_id, lapic=self.irqchip_in_kernel)
