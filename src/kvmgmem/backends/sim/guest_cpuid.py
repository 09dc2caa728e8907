"""The guest's CPUID: answered from the vCPU's KVM_SET_CPUID2 table with KVM's lookup rules.

Why here and not the CPU emulator's own model: on KVM, CPUID always exits and ``kvm_emulate_cpuid`` answers it
from the table userspace set (``arch/x86/kvm/cpuid.c``), so the guest sees exactly what the VMM chose — the
sim's vendor string, its address widths, the KVM paravirtual leaves — not the emulator's GenuineIntel model.
A vCPU whose table is empty (no KVM_SET_CPUID2) answers zeros for every leaf, as KVM does.

The rules (``kvm_cpuid``, ``kvm_find_cpuid_entry2``, ``get_out_of_range_cpuid_entry``):

* an entry matches on ``function``, and on ``index`` too only if its flags have
  ``KVM_CPUID_FLAG_SIGNIFCANT_INDEX``; the first match wins;
* no exact match: unless the guest vendor (leaf 0) is AMD or Hygon, a function beyond its class's maximum
  (leaf 0, 0x80000000, 0x4000xx00 or 0xc0000000 says which is the last) answers the *maximum basic leaf*, with the
  index asked for; a function inside the range with no entry answers zeros;
* zeros for leaf 0xB/0x1F still carry ECX[7:0] = the index and EDX = the x2APIC id from subleaf 1, if the
  leaf exists;
* KVM-owned bits are refreshed from the vCPU's state (``kvm_update_cpuid_runtime``): OSXSAVE from CR4, APIC
  from the APIC base MSR's enable bit, OSPKE from CR4. They are part of what KVM_GET_CPUID2 returns too.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmgmem import uapi

X86_CR4_OSXSAVE = 1 << 18
X86_CR4_PKE = 1 << 22
MSR_IA32_APICBASE_ENABLE = 1 << 11
_LEAF1_ECX_OSXSAVE = 1 << 27
_LEAF1_EDX_APIC = 1 << 9
_LEAF7_ECX_OSPKE = 1 << 4
_AMD_LIKE = {b"AuthenticAMD", b"HygonGenuine"}


def find_entry(
    entries: Sequence[uapi.kvm_cpuid_entry2], function: int, index: int | None = None
) -> uapi.kvm_cpuid_entry2 | None:
    """``kvm_find_cpuid_entry2``: the first entry for ``function`` whose index matches, or whose index is not
    significant. ``index`` None is ``kvm_find_cpuid_entry`` (KVM_CPUID_INDEX_NOT_SIGNIFICANT): any index."""
    for e in entries:
        if e.function != function:
            continue
        if index is None or not e.flags & uapi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == index:
            return e
    return None


def _vendor(entry: uapi.kvm_cpuid_entry2) -> bytes:
    return b"".join(r.to_bytes(4, "little") for r in (entry.ebx, entry.edx, entry.ecx))


def _out_of_range(entries: Sequence[uapi.kvm_cpuid_entry2], function: int, index: int) -> uapi.kvm_cpuid_entry2 | None:
    """``get_out_of_range_cpuid_entry``: the max basic leaf's entry for a function beyond its class, or None."""
    basic = find_entry(entries, 0)
    if basic is None or _vendor(basic) in _AMD_LIKE:
        return None
    if 0x40000000 <= function <= 0x4FFFFFFF:
        klass = find_entry(entries, function & 0xFFFFFF00)
    elif function >= 0xC0000000:
        klass = find_entry(entries, 0xC0000000)
    else:
        klass = find_entry(entries, function & 0x80000000)
    if klass is not None and function <= klass.eax:
        return None
    return find_entry(entries, basic.eax, index)


def runtime_entries(entries: Sequence[uapi.kvm_cpuid_entry2], cr4: int, apic_base: int) -> list[uapi.kvm_cpuid_entry2]:
    """Copies of ``entries`` with the bits ``kvm_update_cpuid_runtime`` owns set from the vCPU's state."""
    out = [uapi.kvm_cpuid_entry2.from_buffer_copy(e) for e in entries]
    leaf1 = find_entry(out, 1)
    if leaf1 is not None:
        leaf1.ecx = _change(leaf1.ecx, _LEAF1_ECX_OSXSAVE, bool(cr4 & X86_CR4_OSXSAVE))
        leaf1.edx = _change(leaf1.edx, _LEAF1_EDX_APIC, bool(apic_base & MSR_IA32_APICBASE_ENABLE))
    leaf7 = find_entry(out, 7, 0)
    if leaf7 is not None:
        leaf7.ecx = _change(leaf7.ecx, _LEAF7_ECX_OSPKE, bool(cr4 & X86_CR4_PKE))
    return out


def _change(value: int, bit: int, on: bool) -> int:
    return value | bit if on else value & ~bit


def kvm_cpuid(entries: Sequence[uapi.kvm_cpuid_entry2], function: int, index: int) -> tuple[int, int, int, int]:
    """``kvm_cpuid(..., exact_only=false)``: (EAX, EBX, ECX, EDX) for CPUID with EAX=``function``,
    ECX=``index`` (both 32-bit), from ``entries`` (already refreshed by :func:`runtime_entries`)."""
    entry = find_entry(entries, function, index)
    if entry is None:
        entry = _out_of_range(entries, function, index)
        if entry is not None:
            function = entry.function  # leaf-specific handling below applies to the max basic leaf
    if entry is not None:
        return entry.eax, entry.ebx, entry.ecx, entry.edx
    if function in (0xB, 0x1F):
        sub1 = find_entry(entries, function, 1)
        if sub1 is not None:
            return 0, 0, index & 0xFF, sub1.edx
    return 0, 0, 0, 0
