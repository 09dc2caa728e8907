"""What a KVM (real or sim) can do for guest_memfd: the data behind ``kvmgmem caps``.

The verdict is computed from capabilities only, never from the backend's name, so the same words describe a
future host that does support private memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmgmem import uapi
from kvmgmem.api import System
from kvmgmem.errors import KvmError


@dataclass
class CapsReport:
    """What ``kvmgmem caps`` reports: every capability on the system and per VM type, and a verdict in words."""

    backend: str
    selection_reason: str
    system_caps: dict[str, int]
    vm_types: list[int]
    vm_caps: dict[str, dict[str, int]] = field(default_factory=dict)
    vm_errors: dict[str, str] = field(default_factory=dict)
    verdict: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the report as the JSON object ``kvmgmem caps --json`` prints."""
        return {
            "backend": self.backend,
            "selection_reason": self.selection_reason,
            "system": self.system_caps,
            "vm_types": {uapi.VM_TYPE_NAMES.get(t, str(t)): t for t in self.vm_types},
            "per_vm_type": self.vm_caps,
            "vm_errors": self.vm_errors,
            "guest_memfd_flags": _flag_names(self.system_caps.get("GUEST_MEMFD_FLAGS", 0)),
            "verdict": self.verdict,
        }


def _flag_names(mask: int) -> list[str]:
    names = {uapi.GUEST_MEMFD_FLAG_MMAP: "MMAP", uapi.GUEST_MEMFD_FLAG_INIT_SHARED: "INIT_SHARED"}
    return [names.get(1 << b, f"bit{b}") for b in range(64) if mask & (1 << b)]


def _query(check: Any) -> dict[str, int]:
    return {name: check(cap) for name, cap in uapi.CAPS.items()}


def collect(system: System) -> CapsReport:
    """Query every cap in ``uapi.CAPS`` (include/uapi/linux/kvm.h) on the system and on a VM of every supported type."""
    report = CapsReport(
        backend=system.backend,
        selection_reason=system.selection_reason,
        system_caps=_query(system.check_extension),
        vm_types=sorted(system.supported_vm_types),
    )
    for vm_type in report.vm_types:
        name = uapi.VM_TYPE_NAMES.get(vm_type, str(vm_type))
        try:
            with system.create_vm(vm_type) as vm:
                report.vm_caps[name] = _query(vm.check_extension)
        except KvmError as e:
            report.vm_errors[name] = str(e)
    report.verdict = verdict(report)
    return report


def verdict(report: CapsReport) -> list[str]:
    """Plain-words summary of what this KVM can run."""
    caps = report.system_caps
    lines = []
    gmem = caps.get("GUEST_MEMFD", 0) and caps.get("USER_MEMORY2", 0)
    lines.append(f"guest_memfd: {'yes' if gmem else 'no'} (KVM_CAP_GUEST_MEMFD, KVM_CAP_USER_MEMORY2)")
    flags = caps.get("GUEST_MEMFD_FLAGS", 0)
    mmap_ok = bool(flags & uapi.GUEST_MEMFD_FLAG_MMAP)
    lines.append(
        f"guest_memfd mmap: {'yes' if mmap_ok else 'no'} (GUEST_MEMFD_FLAGS = {flags}: "
        f"{', '.join(_flag_names(flags)) or 'none'})"
    )
    private_types = [t for t in report.vm_types if t in uapi.PRIVATE_MEM_VM_TYPES]
    attrs = caps.get("MEMORY_ATTRIBUTES", 0) & uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    if private_types and attrs:
        names = ", ".join(uapi.VM_TYPE_NAMES.get(t, str(t)) for t in private_types)
        lines.append(f"private memory: yes (VM types with private memory: {names}; MEMORY_ATTRIBUTES has PRIVATE)")
    else:
        missing = []
        if uapi.KVM_X86_SW_PROTECTED_VM not in report.vm_types:
            missing.append("KVM_X86_SW_PROTECTED_VM is missing from KVM_CAP_VM_TYPES")
        if not attrs:
            missing.append("KVM_CAP_MEMORY_ATTRIBUTES lacks PRIVATE")
        lines.append(f"private memory: no, because {' and '.join(missing)}")
        if report.backend != "sim":
            lines.append("so private memory needs the sim backend (kvmgmem.open('sim'), or backend='auto')")
    return lines
