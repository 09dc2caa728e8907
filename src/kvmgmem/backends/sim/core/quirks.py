"""x86 KVM quirks: KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS / KVM_CAP_DISABLE_QUIRKS2) on a VM, and the one quirk
the sim's behaviour depends on, KVM_X86_QUIRK_SLOT_ZAP_ALL (``kvm_arch_flush_shadow_memslot``).

Why the sim keeps quirks it does not model: KVM_CAP_DISABLE_QUIRKS2 answers ``kvm_caps.supported_quirks`` whatever
a given VM will exercise, and userspace (upstream's set_memory_region_test) decides from that answer which passes to
run. So the sim reports and accepts every quirk of its profile's kernel; only SLOT_ZAP_ALL changes what the sim
does. ``NOT_MODELLED`` says, for each other quirk, what disabling it changes in the kernel.
"""

from __future__ import annotations

import errno

from kvmgmem import uapi
from kvmgmem.errors import KvmError

from .profile import Profile

#: What disabling each quirk changes in KVM, for the quirks the sim accepts but does not model (their behaviour
#: is outside the sim: no local APIC, MTRRs, feature MSRs, nested virtualization or vendor-specific hypercall).
NOT_MODELLED: dict[int, str] = {
    uapi.KVM_X86_QUIRK_LINT0_REENABLED: "the BSP's LINT0 stays masked at APIC reset, not ExtINT (kvm_lapic_reset)",
    uapi.KVM_X86_QUIRK_CD_NW_CLEARED: "SVM keeps guest CR0.CD/NW as written instead of clearing them (svm_set_cr0)",
    uapi.KVM_X86_QUIRK_LAPIC_MMIO_HOLE: (
        "with the APIC disabled or in x2APIC mode, its MMIO page is ordinary MMIO instead of reading all-ones "
        "and ignoring writes"
    ),
    uapi.KVM_X86_QUIRK_OUT_7E_INC_RIP: "an OUT to port 0x7e exiting to userspace leaves RIP on the instruction",
    uapi.KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT: "MONITOR/MWAIT are enabled by IA32_MISC_ENABLE.MWAIT, not CPUID.MWAIT",
    uapi.KVM_X86_QUIRK_FIX_HYPERCALL_INSN: (
        "the other vendor's hypercall instruction is no longer patched to the native one but gets #UD "
        "(the sim executes VMCALL and VMMCALL alike)"
    ),
    uapi.KVM_X86_QUIRK_MWAIT_NEVER_UD_FAULTS: "MONITOR/MWAIT #UD when not enabled instead of always being NOPs",
    uapi.KVM_X86_QUIRK_STUFF_FEATURE_MSRS: (
        "feature MSRs (ARCH_CAPABILITIES, PLATFORM_INFO, PERF_CAPABILITIES) start at 0 instead of KVM's maximum "
        "and are not rewritten on KVM_SET_CPUID2"
    ),
    uapi.KVM_X86_QUIRK_IGNORE_GUEST_PAT: "VMX with TDP honours the guest PAT instead of forcing write-back",
    uapi.KVM_X86_QUIRK_VMCS12_ALLOW_FREEZE_IN_SMM: (
        "nested VM-entry's consistency check refuses DEBUGCTL.FREEZE_IN_SMM in vmcs12"
    ),
    uapi.KVM_X86_QUIRK_NESTED_SVM_SHARED_PAT: "a nested SVM guest gets its own gPAT instead of sharing L1's PAT",
}


def disable_quirks(profile: Profile, disabled: int, cap: int, mask: int) -> int:
    """``kvm->arch.disabled_quirks`` after KVM_ENABLE_CAP(``cap``, args[0] = ``mask``) on a VM whose quirks
    ``disabled`` are off (x86 ``kvm_vm_ioctl_enable_cap``, flags already checked). DISABLE_QUIRKS2 refuses a bit
    outside the supported quirks with EINVAL; DISABLE_QUIRKS ignores such bits. Since 6.16 the supported bits are
    added to what is already disabled; before, args[0] replaced it (and DISABLE_QUIRKS stored it unchecked)."""
    supported = profile.supported_quirks
    if cap == uapi.KVM_CAP_DISABLE_QUIRKS2 and mask & ~supported:
        raise KvmError(
            errno.EINVAL, "KVM_ENABLE_CAP", f"DISABLE_QUIRKS2 args[0] {mask:#x} has bits outside {supported:#x}"
        )
    if profile.quirks_stay_disabled:
        return disabled | (mask & supported)
    return mask


def flush_zaps_all(profile: Profile, vm_type: int, disabled: int) -> bool:
    """Whether deleting or moving a memslot zaps every SPTE of the VM (``kvm_mmu_zap_all_fast``) rather than only
    the slot's gfn range (``kvm_mmu_zap_memslot``), as ``kvm_arch_flush_shadow_memslot`` decides: always before
    the SLOT_ZAP_ALL quirk existed (6.12); since, only for KVM_X86_DEFAULT_VMs that did not disable the quirk."""
    quirk = uapi.KVM_X86_QUIRK_SLOT_ZAP_ALL
    if not profile.valid_quirks & quirk:
        return True
    return vm_type == uapi.KVM_X86_DEFAULT_VM and not disabled & quirk
