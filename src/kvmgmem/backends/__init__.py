"""Backend selection: ``kvmgmem.open(backend="auto"|"kvm"|"sim")``.

``auto`` picks real KVM when the host can do what is asked (``/dev/kvm`` opens and, if a VM type is named,
the host supports it), otherwise the sim; the chosen System says why in ``selection_reason``.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvmgmem.api import System

BACKENDS = ("kvm", "sim")


def _open_backend(name: str, **options: Any) -> System:
    module = importlib.import_module(f"kvmgmem.backends.{name}")
    system: System = module.open_system(**options)
    return system


def open(backend: str = "auto", *, vm_type: int | None = None, **options: Any) -> System:
    """Open a KVM. ``vm_type`` (for ``auto``) is the VM type the caller needs; ``options`` go to the backend
    (the sim takes ``profile=``)."""
    if backend in BACKENDS:
        system = _open_backend(backend, **options)
        system.selection_reason = f"backend {backend!r} requested"
        return system
    if backend != "auto":
        raise ValueError(f"kvmgmem.open: unknown backend {backend!r} (choose auto, {', '.join(BACKENDS)})")
    why = ""
    try:
        system = _open_backend("kvm")
    except OSError as e:
        why = f"/dev/kvm unusable ({e})"
    else:
        if vm_type is None or vm_type in system.supported_vm_types:
            system.selection_reason = "auto: /dev/kvm can run the requested VM type"
            return system
        why = f"/dev/kvm lacks VM type {vm_type}"
        system.close()
    try:
        system = _open_backend("sim", **options)
    except ImportError as e:
        raise OSError(f"kvmgmem.open: {why}, and the sim backend is unavailable ({e})") from e
    system.selection_reason = f"auto: {why}, using the sim"
    return system
