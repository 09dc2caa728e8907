"""The kernel's CPUID rules outside the guest: KVM_GET_SUPPORTED_CPUID's table, and which tables KVM_SET_CPUID2 takes.

Why here and not beside the guest's lookup (``backends/sim/guest_cpuid.py``, ``kvm_cpuid``): that one runs in the
CPU layer, on every CPUID the guest executes, and the CPU may not import the core; these answer ioctls, and are the
core's like every other errno and table the sim's kernel gives (``VcpuCore.set_cpuid2`` uses the checks).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmgmem import uapi

from .profile import Profile

_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def check_cpuid(entries: Sequence[uapi.kvm_cpuid_entry2]) -> str | None:
    """Why ``kvm_check_cpuid`` refuses the table (EINVAL), or None: the linear-address width in leaf 0x80000008
    (its first entry, any index, as ``kvm_find_cpuid_entry``) must be 48, 57 or 0."""
    leaf = next((e for e in entries if e.function == 0x80000008), None)
    if leaf is not None:
        vaddr_bits = (leaf.eax >> 8) & 0xFF
        if vaddr_bits not in (0, 48, 57):
            return f"CPUID 0x80000008 gives {vaddr_bits} linear-address bits (48, 57 or 0)"
    return None


def cpuid_equal(a: Sequence[uapi.kvm_cpuid_entry2], b: Sequence[uapi.kvm_cpuid_entry2]) -> bool:
    """``kvm_cpuid_check_equal``: the same entries in the same order (function, index, flags, registers)."""
    if len(a) != len(b):
        return False
    return all(all(getattr(x, f) == getattr(y, f) for f in _CPUID_FIELDS) for x, y in zip(a, b, strict=True))


def _entry(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0) -> uapi.kvm_cpuid_entry2:
    e = uapi.kvm_cpuid_entry2()
    e.function, e.eax, e.ebx, e.ecx, e.edx = function, eax, ebx, ecx, edx
    return e


def _regs4(text: bytes) -> tuple[int, int, int]:
    a, b, c = (int.from_bytes(text[i : i + 4], "little") for i in (0, 4, 8))
    return a, b, c


def supported_cpuid(profile: Profile) -> list[uapi.kvm_cpuid_entry2]:
    """KVM_GET_SUPPORTED_CPUID (``kvm_dev_ioctl_get_cpuid``) of the sim: a small table for a 64-bit guest — vendor,
    long mode/NX, the KVM leaves with KVM_FEATURE_HC_MAP_GPA_RANGE, and the physical address width of the profile."""
    vb, vd, vc = _regs4(b"KVMgmemSimCP")
    k1, k2, k3 = _regs4(b"KVMKVMKVM\0\0\0")
    return [
        _entry(0x0, eax=0xD, ebx=vb, ecx=vc, edx=vd),
        _entry(0x1, eax=0x000806F0, ecx=0x80000000, edx=0x078BFBFF),
        _entry(0x40000000, eax=0x40000001, ebx=k1, ecx=k2, edx=k3),
        _entry(0x40000001, eax=1 << uapi.KVM_FEATURE_HC_MAP_GPA_RANGE),
        _entry(0x80000000, eax=0x80000008),
        _entry(0x80000001, edx=(1 << 29) | (1 << 20) | (1 << 11)),
        _entry(0x80000008, eax=(48 << 8) | profile.max_gpa_bits if profile.max_gpa_bits <= 48 else (48 << 8) | 48),
    ]
