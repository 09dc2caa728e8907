"""Kernel profiles: which version's behaviour the sim models, plus the host configuration it mirrors.

Why a profile and not flags sprinkled through the code: the kernel's history since 6.8 has a handful of switches
that separate 6.8, 6.18 and 7.2; each rule in the model asks the profile one named question, so a reader can see
every version difference in this file.

"6.18" (the default) is upstream 6.18 built the way the sim is most useful: with KVM_X86_SW_PROTECTED_VM and
SMM, so private memory can be exercised. "host" is this project's host: the same 6.18 rules, built without
KVM_X86_SW_PROTECTED_VM (VM_TYPES 1, MEMORY_ATTRIBUTES 0, KVM_SET_MEMORY_ATTRIBUTES → ENOTTY) and without SMM
(one memslot address space, KVM_CAP_MULTI_ADDRESS_SPACE 0). Where the host still differs, the difference is
the host's, not the model's, and the sim keeps upstream's behaviour (see ``HOST_DEVIATIONS``).

Host configuration that differs between machines (SMM address spaces, memslot count, physical address
width, whether SW_PROTECTED VMs are compiled in) is a profile setting too, overridable per ``open_system``.
Every value is checked when the profile is built, so a bad option is a ValueError at ``kvmgmem.open``.
"""

from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass, replace
from typing import Any

from kvmgmem import uapi

#: Sim-only guest_memfd creation flag for the v12 RFC's huge pages (KVM_GUEST_MEMFD_ALLOW_HUGEPAGE in "KVM:
#: guest_memfd() and per-page attributes", Sep 2023; dropped before the 6.8 merge). Bit 63 can never collide
#: with an upstream flag (upstream allocates from bit 0 up; 6.18 uses bits 0–1). Accepted and reported in
#: KVM_CAP_GUEST_MEMFD_FLAGS only when the profile option ``hugepage`` is on.
SIM_GUEST_MEMFD_FLAG_HUGEPAGE = 1 << 63

#: Page-table levels, as KVM numbers them: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB.
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, value: object, lo: int, hi: int) -> None:
    """ValueError unless ``value`` is an int (not a bool) in [lo, hi]."""
    if not _is_int(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise ValueError(f"sim profile option {name} must be an integer in {lo}..{hi}, not {value!r}")


def level_pages(level: int) -> int:
    """Number of 4 KiB pages one mapping at ``level`` covers."""
    return 1 << (9 * (level - 1))


@dataclass(frozen=True)
class Profile:
    """The questions the model asks about the kernel it imitates."""

    name: str
    version: tuple[int, int]
    #: guest_memfd creation flags exist (6.18+: MMAP, INIT_SHARED); before that every flag is EINVAL.
    gmem_flags: bool
    #: GUEST_MEMFD memslots allowed on every VM type (6.18+) instead of only private-memory VMs.
    gmem_slots_all_vm_types: bool
    #: Memslots bound to an MMAP guest_memfd are GMEM_ONLY: every access is served from gmem (6.18+).
    gmem_only_slots: bool
    #: READONLY together with GUEST_MEMFD is EINVAL (Feb 2024 fix to `check_memory_region_flags`, "Fixes:
    #: a7800aa80ea4"; we place it in 6.8 final, though it may have landed in 6.9 — set False to model the original
    #: merge).
    reject_readonly_gmem: bool
    #: A FLAGS_ONLY update toggling GUEST_MEMFD is EINVAL (Dec 2025 fix, backported to stable; this host's
    #: 6.18.44 has it, as measured).
    reject_gmem_flag_toggle: bool
    #: Overlapping guest_memfd bindings: EINVAL (≤7.1) or EEXIST (7.2).
    bind_overlap_errno: int
    #: Binding offsets/sizes checked in unsigned arithmetic (7.2). ≤7.1 uses signed loff_t, so
    #: offset 0x7ffffffffffff000 + size 0x4000 wraps negative and passes (upstream guest_memfd_test's
    #: invalid_binding case fails on this 6.18 host for that reason).
    unsigned_bind_offsets: bool
    #: KVM_CAP_GUEST_MEMFD answers 1 on every VM (6.18+) instead of only system/private-memory VMs.
    gmem_cap_everywhere: bool
    #: The KVM_PRE_FAULT_MEMORY vCPU ioctl exists (6.10+, CONFIG_KVM_GENERIC_PRE_FAULT_MEMORY); before that
    #: x86's ``kvm_arch_vcpu_ioctl`` answers the unknown ioctl with EINVAL.
    pre_fault_memory: bool = True
    #: KVM_X86_VALID_QUIRKS (arch/x86/include/asm/kvm_host.h), the quirks this version knows. Bits 0–6 predate
    #: 6.8; SLOT_ZAP_ALL (7) and STUFF_FEATURE_MSRS (8) came in 6.12, IGNORE_GUEST_PAT (9) in 6.16,
    #: VMCS12_ALLOW_FREEZE_IN_SMM (10) in 7.0, tagged for stable (this host's 6.18.44 reports it, as measured),
    #: NESTED_SVM_SHARED_PAT (11) by 7.2. What each one changes, and which the sim models: ``core/quirks.py``.
    valid_quirks: int = 0x7FF
    #: KVM_ENABLE_CAP(DISABLE_QUIRKS/DISABLE_QUIRKS2) only ever adds supported bits to ``disabled_quirks``
    #: (6.16: "do not allow re-enabling quirks" with ``kvm_caps.supported_quirks``). Before, both assign
    #: args[0], so a later call re-enables what an earlier one disabled (DISABLE_QUIRKS unchecked).
    quirks_stay_disabled: bool = True
    # --- host configuration ---------------------------------------------------------------------------
    #: CONFIG_KVM_SW_PROTECTED_VM (+ generic memory attributes) compiled in. The real host lacks it; the sim
    #: has it by default because it is the oracle for private memory. False (part of profile "host"): VM_TYPES 1,
    #: MEMORY_ATTRIBUTES 0 and KVM_SET_MEMORY_ATTRIBUTES → ENOTTY.
    sw_protected: bool = True
    #: Two-dimensional paging (EPT/NPT, ``tdp_enabled``). False = shadow paging, as on this project's host:
    #: KVM_CAP_PRE_FAULT_MEMORY answers 0 and ``kvm_tdp_page_prefault`` refuses with EOPNOTSUPP.
    tdp: bool = True
    #: Memslot address spaces of a VM without private memory (x86: 2 with SMM). Private VMs always have 1.
    #: 1 = a kernel built without SMM, where KVM_CAP_MULTI_ADDRESS_SPACE is compiled out and answers 0.
    address_spaces: int = 2
    #: User memslots per address space (KVM_CAP_NR_MEMSLOTS).
    nr_memslots: int = uapi.KVM_USER_MEM_SLOTS
    #: Guest physical address width: a memslot ending above it is EINVAL at commit (`__kvm_set_memory_region`).
    #: 52 = what x86 KVM uses without TDP (this host runs shadow paging).
    max_gpa_bits: int = 52
    #: Highest user virtual address + 1 (TASK_SIZE_MAX, 4-level paging): the userspace_addr range check.
    user_addr_limit: int = 0x7FFFFFFFF000
    #: Largest page the host mapping behind a memslot's userspace_addr provides (the sim's assumption about
    #: host THP): shared mappings may be this large where uniform (`hugepage_has_attrs`). 2 = 2 MiB.
    host_mapping_level: int = PG_LEVEL_2M
    #: Largest TDP mapping level (2 = 2 MiB; this host's guests lack 1 GiB pages).
    max_mapping_level: int = PG_LEVEL_2M
    #: Enable the v12 RFC's huge-page guest_memfd (SIM_GUEST_MEMFD_FLAG_HUGEPAGE, modelled on
    #: KVM_GUEST_MEMFD_ALLOW_HUGEPAGE). Sim-only.
    hugepage: bool = False
    #: KVM_GET_TSC_KHZ's answer (the host's ``tsc_khz``): a nominal value, the guest's TSC being the CPU
    #: emulator's counter.
    tsc_khz: int = 2_000_000
    nr_vcpus: int = 2
    max_vcpus: int = 1024
    max_vcpu_id: int = 4096
    #: Sim-only, not a kernel cap (None = off, the upstream behaviour). Bit N (12..51; SEV's C-bit is
    #: typically 51) of a guest leaf PTE marks the access private on KVM_X86_SW_PROTECTED_VMs: the vCPU's
    #: page walk strips it from the address and reports private/shared per access, as SNP/TDX hardware does,
    #: so an access against the gfn's attribute exits with KVM_EXIT_MEMORY_FAULT (the private/shared mismatch
    #: check in `kvm_mmu_faultin_pfn`, then `kvm_mmu_prepare_memory_fault_exit`) —
    #: guest-driven implicit conversions. Other VM types ignore it (bit N stays an address bit).
    private_access_bit: int | None = None

    def __post_init__(self) -> None:
        """Refuse values the model cannot honour, here rather than as an IndexError deep in a VM later."""
        bit = self.private_access_bit
        if bit is not None and (isinstance(bit, bool) or not isinstance(bit, int) or not 12 <= bit <= 51):
            raise ValueError(f"private_access_bit must be None or a PTE address bit 12..51, not {bit!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"sim profile option {f.name} must be True or False, not {value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"sim profile name must be a non-empty string, not {self.name!r}")
        if not (isinstance(self.version, tuple) and len(self.version) == 2 and all(_is_int(v) for v in self.version)):
            raise ValueError(f"sim profile version must be a (major, minor) tuple, not {self.version!r}")
        if self.bind_overlap_errno not in (errno.EINVAL, errno.EEXIST):
            raise ValueError(f"bind_overlap_errno must be EINVAL or EEXIST, not {self.bind_overlap_errno!r}")
        _check_range("address_spaces", self.address_spaces, 1, 2)  # x86: 2 with SMM, 1 without
        _check_range("nr_memslots", self.nr_memslots, 1, uapi.KVM_USER_MEM_SLOTS)
        _check_range("max_gpa_bits", self.max_gpa_bits, 32, 52)  # x86-64 MAXPHYADDR
        _check_range("user_addr_limit", self.user_addr_limit, uapi.PAGE_SIZE, 1 << 57)  # 5-level paging at most
        if self.user_addr_limit % uapi.PAGE_SIZE:
            raise ValueError(f"user_addr_limit must be page aligned, not {self.user_addr_limit:#x}")
        _check_range("host_mapping_level", self.host_mapping_level, PG_LEVEL_4K, PG_LEVEL_1G)
        _check_range("max_mapping_level", self.max_mapping_level, PG_LEVEL_4K, PG_LEVEL_1G)
        _check_range("tsc_khz", self.tsc_khz, 1, (1 << 31) - 1)  # KVM_GET_TSC_KHZ returns it as an int
        _check_range("valid_quirks", self.valid_quirks, 0, (1 << 64) - 1)  # a u64 mask, KVM_ENABLE_CAP's args[0]
        _check_range("nr_vcpus", self.nr_vcpus, 1, 1 << 32)
        _check_range("max_vcpus", self.max_vcpus, 1, 1 << 32)
        _check_range("max_vcpu_id", self.max_vcpu_id, 1, 1 << 32)

    def with_options(self, **options: Any) -> Profile:
        """This profile with host-configuration (or any other) fields replaced; unknown names → TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown sim profile option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **options)

    # --- derived answers ---------------------------------------------------------------------------------

    @property
    def vm_types_mask(self) -> int:
        mask = 1 << uapi.KVM_X86_DEFAULT_VM
        if self.sw_protected:
            mask |= 1 << uapi.KVM_X86_SW_PROTECTED_VM
        return mask

    def gmem_valid_flags(self, has_private_mem: bool | None) -> int:
        """Creation flags accepted (``has_private_mem`` None = asked on the system fd),
        `kvm_vm_ioctl_check_extension_generic`/`kvm_gmem_create`."""
        if not self.gmem_flags:
            flags = 0
        else:
            flags = uapi.GUEST_MEMFD_FLAG_MMAP
            if not has_private_mem:  # INIT_SHARED iff kvm == NULL or the VM has no private memory
                flags |= uapi.GUEST_MEMFD_FLAG_INIT_SHARED
        if self.hugepage:
            flags |= SIM_GUEST_MEMFD_FLAG_HUGEPAGE
        return flags

    @property
    def supported_quirks(self) -> int:
        """``kvm_caps.supported_quirks``, KVM_CAP_DISABLE_QUIRKS2's answer: the valid quirks, less IGNORE_GUEST_PAT
        without TDP (``kvm_x86_vendor_init``: shadow paging always ignores guest PAT). VMX also drops it on a CPU
        without self-snoop; the sim assumes one with it."""
        if self.tdp:
            return self.valid_quirks
        return self.valid_quirks & ~uapi.KVM_X86_QUIRK_IGNORE_GUEST_PAT

    @property
    def max_gfn(self) -> int:
        return (1 << (self.max_gpa_bits - uapi.PAGE_SHIFT)) - 1


_V6_18 = Profile(
    name="6.18",
    version=(6, 18),
    gmem_flags=True,
    gmem_slots_all_vm_types=True,
    gmem_only_slots=True,
    reject_readonly_gmem=True,
    reject_gmem_flag_toggle=True,
    bind_overlap_errno=errno.EINVAL,
    unsigned_bind_offsets=False,
    gmem_cap_everywhere=True,
)

#: The other versions as their deltas from 6.18, one field per upstream change (see the field comments).
PROFILES: dict[str, Profile] = {
    "6.8": replace(
        _V6_18,
        name="6.8",
        version=(6, 8),
        gmem_flags=False,  # no creation flags, no mmap before 6.18
        gmem_slots_all_vm_types=False,  # GUEST_MEMFD slots only on private-memory VMs
        gmem_only_slots=False,
        reject_gmem_flag_toggle=False,  # before the Dec 2025 fix
        gmem_cap_everywhere=False,
        pre_fault_memory=False,  # KVM_PRE_FAULT_MEMORY came in 6.10
        valid_quirks=0x7F,  # no SLOT_ZAP_ALL yet: deleting or moving a memslot always zaps everything
        quirks_stay_disabled=False,
    ),
    "6.18": _V6_18,
    #: This project's host: 6.18 built without KVM_X86_SW_PROTECTED_VM and without SMM (as measured there: VM_TYPES 1,
    #: MEMORY_ATTRIBUTES 0, MULTI_ADDRESS_SPACE 0), on shadow paging (PRE_FAULT_MEMORY 0). What still differs is
    #: listed in HOST_DEVIATIONS.
    "host": replace(_V6_18, name="host", sw_protected=False, address_spaces=1, tdp=False),
    "7.2": replace(
        _V6_18,
        name="7.2",
        version=(7, 2),
        bind_overlap_errno=errno.EEXIST,  # commit 7ea987a905855
        unsigned_bind_offsets=True,
        valid_quirks=0xFFF,  # + NESTED_SVM_SHARED_PAT
    ),
}

DEFAULT_PROFILE = "6.18"

#: Where this project's host (Linux 6.18 with the paravirtual kvm_pvm module, shadow paging) differs from
#: upstream 6.18 and therefore from ``profile="host"``. These are the host's deviations: the sim keeps the
#: upstream behaviour, and tests that meet one on the kvm backend report it as a strict expected failure.
HOST_DEVIATIONS: dict[str, str] = {
    "gmem_only_slot_hva_at_cpl0": (
        "a memslot bound to an MMAP guest_memfd is served from the guest_memfd for native (CPL3) guest accesses, "
        "but from the memslot's userspace_addr for emulated CPL0 accesses and page-table walks; upstream 6.18 "
        "(kvm_gmem_get_pfn for every access of a gmem-only slot) and the sim always use the guest_memfd"
    ),
    "vmcall_never_returns": (
        "KVM_CAP_EXIT_HYPERCALL is advertised and KVM_ENABLE_CAP accepts bit KVM_HC_MAP_GPA_RANGE, but a guest "
        "VMCALL at CPL0 never reaches kvm_emulate_hypercall: KVM_RUN spins until a signal, so neither "
        "KVM_EXIT_HYPERCALL nor an error return in RAX is ever produced"
    ),
    "cpuid_host_bits": (
        "CPUID leaf 1 at guest CPL0 returns ECX/EDX feature bits the KVM_SET_CPUID2 table does not have (host bits "
        "such as SSE3, SSE4.x, XSAVE, AVX and HTT merged in), and at CPL3, where guest code runs natively, CPUID "
        "is the host's own; kvm_cpuid answers from the table alone"
    ),
    "vectoring_mmio_shutdown": (
        "an exception whose IDT gate lies in MMIO (no memslot) shuts the guest down (KVM_EXIT_SHUTDOWN) instead "
        "of KVM_EXIT_INTERNAL_ERROR with suberror KVM_INTERNAL_ERROR_DELIVERY_EV (kvm_prepare_event_vectoring_exit)"
    ),
    "unmapped_hva_mmio_at_cpl0": (
        "a guest access at CPL0 (emulated) to a memslot whose userspace_addr has nothing mapped exits with "
        "KVM_EXIT_MMIO at the gpa, and the guest goes on with whatever the VMM answers, instead of failing KVM_RUN "
        "with EFAULT (hva_to_pfn finds no vma: KVM_PFN_ERR_FAULT, and kvm_handle_error_pfn returns -EFAULT without "
        "a memory-fault exit); at CPL3, where guest code runs natively, KVM_RUN fails with EFAULT as upstream"
    ),
    "vmcall_at_cpl3_gp": (
        "a VMCALL from CPL3 (guest code runs natively there) is delivered to the guest as #GP(0) instead of "
        "returning -KVM_EPERM in RAX (kvm_emulate_hypercall's CPL check)"
    ),
}


def get_profile(profile: str | Profile = DEFAULT_PROFILE, **options: Any) -> Profile:
    """A named profile ("6.8", "6.18", "host", "7.2") or a Profile instance, with ``options`` applied."""
    if isinstance(profile, Profile):
        base = profile
    else:
        try:
            base = PROFILES[str(profile)]
        except KeyError:
            raise ValueError(f"unknown sim profile {profile!r} (choose {', '.join(PROFILES)})") from None
    return base.with_options(**options) if options else base
