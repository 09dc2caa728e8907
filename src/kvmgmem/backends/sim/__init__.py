"""The sim backend: a software KVM (README.md, Backends).

``open_system(profile="6.18", **options)`` returns a ``SimSystem``. ``profile`` is "6.8", "6.18" (default:
upstream 6.18 with KVM_X86_SW_PROTECTED_VM and SMM), "host" (this project's host: 6.18 without either) or
"7.2"; ``options`` override profile fields (``core/profile.py``), e.g. ``hugepage=True`` (the sim-only
SIM_GUEST_MEMFD_FLAG_HUGEPAGE), ``sw_protected=False``, ``address_spaces=1``, ``nr_memslots=509``.

``private_access_bit=N`` (sim-only, off by default; not reported by any cap) gives the vCPUs of
KVM_X86_SW_PROTECTED_VMs an SEV-style "C-bit": bit N of a guest leaf PTE marks the access private (and is not
part of the address). Upstream SW_PROTECTED takes private/shared from the gfn's attribute, so a guest can
never trigger an implicit conversion (`kvm_mmu_page_fault`); with the bit, as on SNP/TDX, an access whose type
disagrees with the attribute fails KVM_RUN with EFAULT and a ``MemoryFaultExit`` (flags PRIVATE iff the
access was private, page-aligned gpa, size 4096), which the VMM answers by converting the page and running
again — the instruction then re-executes. ``kvmgmem.open("sim", private_access_bit=51)``;
``System.private_access_bit`` / ``Vm.private_access_bit`` (declared on the API, None on kvm) tell what is in
effect, and ``GuestImage(private_alias=51)`` builds the matching private alias mapping.

Layout: ``core/`` is the pure kernel model; ``system``/``vm``/``gmem``/``vcpu``/``mapping`` adapt it to the
backend-neutral API; ``storage`` and ``fdtable`` own the real resources (memory and fd numbers).
Sim-only surface: ``SimGuestMemfd.inject_poison`` and ``introspect()``, ``SimVm.handle_fault`` /
``add_zap_listener`` (the CPU contract in ``core/mmu.py``); ``Vm.introspect()`` is declared on the API (None on
kvm). ``PROFILES`` and ``HOST_DEVIATIONS`` (the host kernel defects the sim does not copy) are the profile
tables tools may read without reaching into ``core/``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvmgmem.gmem_mapping import GmemMapping

from .core.profile import (
    DEFAULT_PROFILE,
    HOST_DEVIATIONS,
    PROFILES,
    SIM_GUEST_MEMFD_FLAG_HUGEPAGE,
    Profile,
    get_profile,
)

if TYPE_CHECKING:
    from .gmem import SimGuestMemfd
    from .system import SimSystem
    from .vcpu import SimVcpu
    from .vm import SimVm

# The adapters are imported on first use, not with the package: they pull in the CPU (unicorn), and the
# kernel model in ``core/`` must import without it (its tests need no CPU; tests/sim/core/test_layering.py).
_LAZY = {"SimGuestMemfd": ".gmem", "SimSystem": ".system", "SimVcpu": ".vcpu", "SimVm": ".vm"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def open_system(profile: str | Profile = DEFAULT_PROFILE, **options: Any) -> SimSystem:
    """Open the sim with the given kernel profile and host-configuration options."""
    from .system import SimSystem

    return SimSystem(get_profile(profile, **options))


__all__ = [
    "HOST_DEVIATIONS",
    "PROFILES",
    "SIM_GUEST_MEMFD_FLAG_HUGEPAGE",
    "GmemMapping",
    "Profile",
    "SimGuestMemfd",
    "SimSystem",
    "SimVcpu",
    "SimVm",
    "open_system",
]
