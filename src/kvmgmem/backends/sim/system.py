"""``System`` on the sim: capabilities by profile, VM creation, the supported CPUID table (all decided by the core)."""

from __future__ import annotations

import os
import weakref

from kvmgmem import uapi
from kvmgmem.api import System

from . import fdtable
from .core.caps import check_extension
from .core.cpuid_tables import supported_cpuid
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

    def _private_access_bit(self) -> int | None:
        return self.profile.private_access_bit  # the profile option (None = off), not a kernel capability

    def _get_supported_cpuid(self) -> list[uapi.kvm_cpuid_entry2]:
        return supported_cpuid(self.profile)

    def __repr__(self) -> str:
        return f"<SimSystem profile={self.profile.name}{' closed' if self.closed else ''}>"
