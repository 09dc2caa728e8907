"""``System`` on the sim: capabilities by profile, VM creation, the supported CPUID table."""

from __future__ import annotations

import os
import weakref

from kvmgmem import uapi
from kvmgmem.api import System

from . import fdtable
from .core.caps import check_extension
from .core.profile import Profile
from .core.vm import create_vm
from .vm import SimVm


class SimSystem(System):
    """The software KVM. ``profile`` says which kernel it imitates (``core/profile.py``)."""

    backend = "sim"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._fd = fdtable.placeholder_fd()
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    @property
    def fd(self) -> int:
        return self._fd

    def _release(self) -> None:
        self._finalizer()

    def _check_extension(self, cap: int) -> int:
        return check_extension(self.profile, cap, None)

    def _create_vm(self, vm_type: int) -> SimVm:
        return SimVm(self, create_vm(self.profile, vm_type))

    @property
    def private_access_bit(self) -> int | None:
        """The sim-only private access bit (profile option; None = off). Not a kernel capability."""
        return self.profile.private_access_bit

    def _get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        return supported_cpuid(self.profile)

    def __repr__(self) -> str:
        return f"<SimSystem profile={self.profile.name}{' closed' if self.closed else ''}>"


def _entry(function: int, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0) -> uapi.kvm_cpuid_entry2:
    e = uapi.kvm_cpuid_entry2()
    e.function, e.eax, e.ebx, e.ecx, e.edx = function, eax, ebx, ecx, edx
    return e


def _regs4(text: bytes) -> tuple[int, int, int]:
    a, b, c = (int.from_bytes(text[i : i + 4], "little") for i in (0, 4, 8))
    return a, b, c


def supported_cpuid(profile: Profile) -> list[uapi.kvm_cpuid_entry2]:
    """A small CPUID table for a 64-bit guest: vendor, long mode/NX, the KVM leaves with
    KVM_FEATURE_HC_MAP_GPA_RANGE, and the physical address width of the profile."""
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
