"""The kvm backend: thin marshalling over the real ``/dev/kvm`` uAPI (marshal → ioctl → unmarshal)."""

from __future__ import annotations

from typing import Any

from .gmem import KvmGuestMemfd
from .system import DEV_KVM, KvmSystem
from .vcpu import KvmVcpu
from .vm import KvmVm


def open_system(path: str = DEV_KVM, **options: Any) -> KvmSystem:
    if options:
        raise TypeError(f"kvm backend: unknown options {sorted(options)}")
    return KvmSystem(path)


__all__ = ["KvmGuestMemfd", "KvmSystem", "KvmVcpu", "KvmVm", "open_system"]
